"""Training: the loop (trainer) over the run's clock and its components (metric window,
checkpointer, validator, preemption, progress), what it trains (build), the one training step,
optimisers and schedules.

What every command shares about a run (checkpoints, the model file, MLflow) is in
`pipeline.runs`. The trainer is imported on first use, so `python -m pipeline --help` stays
quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.training.summary import RunSummary, summary_table
    from pipeline.training.trainer import Trainer

__all__ = ["RunSummary", "Trainer", "summary_table", "train"]

_LAZY = {"Trainer": "trainer", "RunSummary": "summary", "summary_table": "summary"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.training' has no attribute {name!r}")


def train(recipe) -> RunSummary:
    """Train one recipe to the end (or to preemption) and return its summary."""
    from pipeline.training.trainer import Trainer

    return Trainer(recipe).fit()
