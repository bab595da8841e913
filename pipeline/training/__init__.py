"""Training: the Accelerate trainer, checkpoints, optimisers and MLflow tracking.

The trainer is imported on first use, so `python -m pipeline --help` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.training.trainer import RunSummary, Trainer, summary_table

__all__ = ["RunSummary", "Trainer", "summary_table", "train"]


def __getattr__(name: str) -> Any:
    if name in {"RunSummary", "Trainer", "summary_table"}:
        from pipeline.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'pipeline.training' has no attribute {name!r}")


def train(recipe) -> RunSummary:
    """Train one recipe to the end (or to preemption) and return its summary."""
    from pipeline.training.trainer import Trainer

    return Trainer(recipe).fit()
