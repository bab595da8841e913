"""The run's own picture: training loss and validation error curves, drawn from MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline.runs.tracking import Tracker


def plot_curves(tracker: Tracker, path: Path) -> Path | None:
    """Training loss and validation error curves of the run, as one PNG."""
    loss = tracker.history("train/loss")
    top1 = tracker.history("val/top1_err")
    if not loss and not top1:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        ax1.plot(*zip(*loss, strict=True), lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    if top1:
        ax2.plot(*zip(*top1, strict=True), marker="o", label="top-1")
        top5 = tracker.history("val/top5_err")
        if top5:
            ax2.plot(*zip(*top5, strict=True), marker="o", label="top-5")
        ax2.legend()
    ax2.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    fig.suptitle(f"{tracker.recipe.name} ({tracker.recipe.method.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
