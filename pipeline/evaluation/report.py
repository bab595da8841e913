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
    from pipeline.tables import cell, format_table

    rows = [[key, cell(value, ".2f")] for key, value in results.items()]
    return title + "\n" + format_table(["metric", "value (%)"], rows)


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


def _run_folder(checkpoint: str | Path) -> Path | None:
    """The training run folder a checkpoint belongs to, when it has a tracking journal."""
    from pipeline.runs.tracking import FOLDER

    p = Path(checkpoint)
    for folder in (p, p.parent, p.parent.parent):
        if (folder / FOLDER / "journal.jsonl").is_file():
            return folder
    return None


def log_results(
    recipe: Recipe,
    facts: dict,
    checkpoint: str | Path,
    metrics: dict[str, float],
    artifacts: Sequence[Path] = (),
    artifact_path: str | None = None,
) -> str:
    """Record evaluation results with the checkpoint's training run; one line saying where.

    In a run folder the results join the run's journal (artifacts copied beside it) and are sent
    at once; if MLflow does not answer they wait there for the next `sync-tracking`, like the
    run's own metrics. For a model file outside its run folder they are logged directly (into
    the checkpoint's run if the store has it, else a linked evaluation run carrying this
    process's provenance); a failure is a warning, and the results are printed either way.
    """
    if not recipe.tracking.enabled:
        return "tracking.enabled is false: not logged to MLflow"
    folder = _run_folder(checkpoint)
    if folder is not None:
        return _into_journal(folder, recipe, facts, metrics, artifacts, artifact_path)
    try:
        run_id = _direct(
            recipe, facts.get("mlflow_run_id"), checkpoint, metrics, artifacts, artifact_path
        )
    except Exception as exc:  # the results are printed; a tracking failure loses nothing else
        return f"not logged to MLflow ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return f"logged to mlflow run {run_id}"


def _into_journal(folder, recipe, facts, metrics, artifacts, artifact_path) -> str:
    import shutil

    from pipeline.errors import TrackingError
    from pipeline.runs.journal import Journal
    from pipeline.runs.store import resolve_tracking_uri
    from pipeline.runs.tracking import FOLDER, recorded_run_id, sync

    journal = Journal(folder / FOLDER)
    journal.append("metrics", step=int(facts.get("step") or 0), values=metrics)
    for path in artifacts:
        kept = folder / (artifact_path or "evaluation") / Path(path).name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        journal.append("artifact", path=str(kept.resolve()), folder=artifact_path)
    journal.close()
    try:
        sync(folder, resolve_tracking_uri(recipe.tracking.tracking_uri))
    except TrackingError as exc:
        return (
            f"not yet in MLflow ({exc}); kept in {journal.path}: "
            f"`python -m pipeline sync-tracking {folder}` sends it"
        )
    return f"logged to mlflow run {recorded_run_id(folder)}"


def _direct(recipe, run_id, checkpoint, metrics, artifacts, artifact_path) -> str:
    import mlflow

    from pipeline.runs import provenance
    from pipeline.runs.store import experiment_id, resolve_tracking_uri
    from pipeline.runs.tracking import DESCRIPTION_TAG, UNITS_NOTE

    uri = resolve_tracking_uri(recipe.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    found = _existing_run(run_id)
    diff = None  # the code's diff, for a new run only (the training run has its own)
    if found is not None:
        run = mlflow.start_run(run_id=found)
    else:
        mlflow.set_experiment(experiment_id=experiment_id(recipe.tracking.experiment, uri))
        diff = provenance.git_diff()
        tags = {
            **provenance.run_tags(diff),
            "pipeline.checkpoint": str(checkpoint),
            "pipeline.kind": "evaluation",
            DESCRIPTION_TAG: UNITS_NOTE,
        }
        if run_id:
            tags["pipeline.source_run_id"] = run_id
        run = mlflow.start_run(run_name=f"{recipe.name}-eval", tags=tags)
    with run:
        if diff:
            mlflow.log_text(diff, f"{provenance.DIFF_FOLDER}/{provenance.DIFF_FILE}")
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return run.info.run_id
