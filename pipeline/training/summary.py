"""What a run did, returned by `Trainer.fit()` and printed as a table by `train` and `demo`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.tables import cell, format_table


@dataclass
class RunSummary:
    """What a run did; printed as a table and returned to callers."""

    name: str
    method: str
    params: int
    steps: int
    epochs_done: float
    top1_err: float | None
    top5_err: float | None
    best_top1_err: float | None
    msec_per_batch: float | None
    images_per_s: float | None
    wall_s: float
    mlflow_run_id: str | None
    output_dir: str
    preempted: bool = False
    skipped_files: list[str] = field(default_factory=list)


def summary_table(summaries: list[RunSummary]) -> str:
    """One row per run: method, size, steps, errors (%), speed and wall time."""
    headers = ["run", "method", "params", "steps", "top-1 err (%)", "best (%)", "top-5 err (%)"]
    headers += ["ms/batch", "img/s", "wall s"]
    rows = [
        [
            s.name,
            s.method,
            f"{s.params / 1e6:.2f}M",
            str(s.steps),
            cell(s.top1_err, ".2f"),
            cell(s.best_top1_err, ".2f"),
            cell(s.top5_err, ".2f"),
            cell(s.msec_per_batch, ".0f"),
            cell(s.images_per_s, ".0f"),
            f"{s.wall_s:.0f}",
        ]
        for s in summaries
    ]
    return format_table(headers, rows)
