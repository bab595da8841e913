"""The run's own picture: training loss and validation error curves, drawn from MLflow."""

from __future__ import annotations

from pathlib import Path

from pipeline.runs.tracking import Tracker

Points = list[tuple[int, float]]


def draw_curves(loss: Points, top1: Points, top5: Points, title: str):
    """Training loss per step beside validation error (%) per epoch, as a matplotlib Figure
    (outside pyplot: no global state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    if loss:
        ax1.plot(*zip(*loss, strict=True), lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    for points, label in ((top1, "top-1"), (top5, "top-5")):
        if points:
            ax2.plot(*zip(*points, strict=True), marker="o", label=label)
    if top1 or top5:
        ax2.legend()
    ax2.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    fig.suptitle(title)
    return fig


def plot_curves(tracker: Tracker, path: Path, title: str) -> Path | None:
    """Training loss and validation error curves of the run, as one PNG titled `title`."""
    loss = tracker.history("train/loss")
    top1 = tracker.history("val/top1_err")
    if not loss and not top1:
        return None
    draw_curves(loss, top1, tracker.history("val/top5_err"), title).savefig(path, dpi=110)
    return path
