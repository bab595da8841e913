"""Evaluation results into MLflow (the checkpoint's own run when it can) and onto the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

__all__ = ["log_results", "results_table"]


def results_table(results: dict[str, float], title: str) -> str:
    """The title, then a table of metric names and values (percent, two decimals)."""
    from pipeline.runs.table import cell, format_table

    rows = [[key, cell(value, ".2f")] for key, value in results.items()]
    return title + "\n" + format_table(["metric", "value"], rows)


def _existing_run(run_id: str | None) -> str | None:
    """`run_id` if the tracking store has that run, else None."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return run_id


def log_results(
    recipe: Recipe,
    run_id: str | None,
    checkpoint: str | Path,
    metrics: dict[str, float],
    artifacts: Sequence[Path] = (),
    artifact_path: str | None = None,
) -> str:
    """Log metrics (and artifact files) into the run `run_id` and return its id.

    The tracking store is the recipe's (else $MLFLOW_TRACKING_URI, as the trainer does). When
    the checkpoint's run is not in that store, a linked evaluation run is created in the
    recipe's experiment, tagged with the checkpoint path and the original run id.
    """
    import mlflow

    from pipeline.runs.tracking import experiment_id, resolve_tracking_uri

    uri = resolve_tracking_uri(recipe.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    found = _existing_run(run_id)
    if found is not None:
        run = mlflow.start_run(run_id=found)
    else:
        mlflow.set_experiment(experiment_id=experiment_id(recipe.tracking.experiment, uri))
        tags = {"pipeline.checkpoint": str(checkpoint), "pipeline.kind": "evaluation"}
        if run_id:
            tags["pipeline.source_run_id"] = run_id
        run = mlflow.start_run(run_name=f"{recipe.name}-eval", tags=tags)
    with run:
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return run.info.run_id
