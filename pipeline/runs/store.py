"""The MLflow store the tools read: whether it exists, its experiments and their runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient


def store_exists(uri: str) -> bool:
    """False for a SQLite or file store that is not on disk (opening it would create it)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).is_dir()
    if "://" not in uri:
        return Path(uri).is_dir()
    return True


def open_client(uri: str) -> MlflowClient:
    """An MLflow client bound to `uri` (no global tracking state is changed)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_experiment(name: str, uri: str) -> tuple[MlflowClient, Experiment]:
    """A client and the experiment called `name`, or a PipelineError naming both.

    A store that is not on disk counts as missing, so a typo in the URI creates no empty store.
    """
    client = open_client(uri) if store_exists(uri) else None
    experiment = client.get_experiment_by_name(name) if client is not None else None
    if client is None or experiment is None:
        raise PipelineError(f"MLflow experiment {name!r} not found in tracking store {uri}")
    return client, experiment


def all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Every active run of an experiment, oldest first, across result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], order_by=["attributes.start_time ASC"], page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def run_folder(value: str, uri: str, key: str) -> Path | None:
    """The run folder of an MLflow run id (its recorded `train.output_dir`), or None when
    `value` is not a run id or names an existing path. `key` is the setting, for errors."""
    if not _RUN_ID.fullmatch(value) or Path(value).exists():
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = open_client(uri).get_run(value) if store_exists(uri) else None
    except MlflowException:
        run = None
    if run is None:
        raise PipelineError(f"{key}: {value} is no path, and no MLflow run with that id in {uri}")
    folder = run.data.params.get("train.output_dir")
    if not folder or not Path(folder).is_dir():
        raise PipelineError(
            f"{key}: MLflow run {value} ran in {folder!r}, which is not a folder here (run from "
            "the directory it was started in, or give the folder itself)"
        )
    return Path(folder)
