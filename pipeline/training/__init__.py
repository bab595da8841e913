"""Training: the Accelerate trainer, checkpoints, optimisers and MLflow tracking."""

from pipeline.training.trainer import RunSummary, Trainer, summary_table

__all__ = ["RunSummary", "Trainer", "summary_table", "train"]


def train(recipe) -> RunSummary:
    """Train one recipe to the end (or to preemption) and return its summary."""
    return Trainer(recipe).fit()
