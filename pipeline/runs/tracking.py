"""MLflow tracking: one run per training run, continued on resume; only the main rank logs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.recipe import Recipe, dump_recipe

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(recipe_uri: str | None = None) -> str:
    """The recipe's URI, else `$MLFLOW_TRACKING_URI`, else a SQLite store in the working dir."""
    return recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def artifact_root(uri: str) -> str | None:
    """Where a SQLite store's artifacts go: `mlartifacts/` beside the database file.

    MLflow would otherwise put them in `./mlruns` under whatever folder the process started
    in, scattering a run's files when a requeued Slurm job starts elsewhere.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(name: str, uri: str) -> str:
    """The id of experiment `name` at `uri`, created with its artifact root if it is new."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


class Tracker:
    """Thin wrapper over MLflow that is a no-op on non-main ranks."""

    def __init__(self, recipe: Recipe, enabled: bool) -> None:
        self.recipe = recipe
        self.enabled = enabled
        self.run_id: str | None = None

    def start(self, run_id: str | None, extra_params: dict[str, Any]) -> str | None:
        """Start a new run, or continue `run_id` (resume) without re-logging params."""
        if not self.enabled:
            return run_id
        import mlflow

        uri = resolve_tracking_uri(self.recipe.tracking.tracking_uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id(self.recipe.tracking.experiment, uri))
        system = self.recipe.tracking.system_metrics
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
        else:
            run = mlflow.start_run(
                run_name=self.recipe.tracking.run_name or self.recipe.name,
                log_system_metrics=system,
            )
            mlflow.log_params({**self.recipe.flat(), **extra_params})
            mlflow.log_text(dump_recipe(self.recipe), "recipe.yaml")
            mlflow.set_tags({"method": self.recipe.method.name, "model": self.recipe.model.name})
        self.run_id = run.info.run_id
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled and metrics:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of a metric in this run, the last value per step."""
        if not self.enabled or self.run_id is None:
            return []
        from mlflow.tracking import MlflowClient

        points = MlflowClient().get_metric_history(self.run_id, key)
        return sorted({m.step: m.value for m in sorted(points, key=lambda m: m.timestamp)}.items())

    def end(self, status: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status=status)
