"""The comparison plots: validation error curves overlaid, and final error against msec/batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure():
    """A figure outside pyplot (no global state, no display): it renders to files with Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    return fig, fig.subplots()


def draw_val_curves(
    curves: dict[str, list[tuple[int, float]]],
    references: dict[str, list[tuple[int, float]]] | None = None,
):
    """Validation top-1 error (%) per epoch, one line per run, over the `references` (the
    authors' curves, dashed, cut at the runs' last epoch); None when no run has a history."""
    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    last = max(step for points in curves.values() for step, _ in points)
    for label, points in (references or {}).items():
        shown = [p for p in sorted(points) if p[0] <= last]
        if shown:
            steps, values = zip(*shown, strict=True)
            ax.plot(steps, values, linestyle="--", color="grey", lw=1, label=label)
    for label, points in curves.items():
        steps, values = zip(*sorted(points), strict=True)
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def draw_error_vs_time(rows: list[dict[str, Any]]):
    """Final top-1 error (%) against msec/batch, each point labelled; None when no run has both."""
    points = [
        (r["perf/msec_per_batch"], r["final/top1_err"], r["run"])
        for r in rows
        if r.get("perf/msec_per_batch") is not None and r.get("final/top1_err") is not None
    ]
    if not points:
        return None
    fig, ax = _figure()
    for x, y, label in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("msec / batch (training step)")
    ax.set_ylabel("final top-1 error (%)")
    ax.grid(alpha=0.3)
    return fig


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path)
    return path


def plot_val_curves(
    curves: dict[str, list[tuple[int, float]]],
    path: Path,
    references: dict[str, list[tuple[int, float]]] | None = None,
) -> Path | None:
    """`draw_val_curves` saved as a PNG at `path`; None when there is nothing to draw."""
    return _save(draw_val_curves(curves, references), path)


def plot_error_vs_time(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """`draw_error_vs_time` saved as a PNG at `path`; None when there is nothing to draw."""
    return _save(draw_error_vs_time(rows), path)
