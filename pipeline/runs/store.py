"""The MLflow store: which one (the recipe's URI, `$MLFLOW_TRACKING_URI`, else `./mlflow.db`), a
client for it (SQLite tables created under a lock), whether it exists, its experiments and runs.
Shared by the tracker, the journal's sender and the tools; it imports neither of them."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(recipe_uri: str | None = None) -> str:
    """The recipe's URI, else `$MLFLOW_TRACKING_URI`, else a SQLite store in the working dir."""
    return recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (from the working directory), so that it
    names the same store when it is read back from another folder."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :]
    if uri.startswith(prefix) and not path.startswith("/"):
        return prefix + os.path.abspath(path)
    return uri


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
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except MlflowException:  # created meanwhile by another job
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def probe(uri: str, timeout: float) -> str | None:
    """None when the tracking store at `uri` answers within `timeout` s, else why not."""
    quick_failing_client_settings()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if uri.startswith(("http://", "https://")):
                import requests

                left = max(1.0, deadline - time.monotonic())
                requests.get(uri.rstrip("/") + "/health", timeout=left).raise_for_status()
            else:
                client_for(uri).search_experiments(max_results=1)
            return None
        except Exception as exc:  # any failure to answer is "not reachable"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if time.monotonic() + 2 > deadline:
            return reason
        time.sleep(2)


def quick_failing_client_settings() -> None:
    """MLflow's HTTP client retries for minutes by default; the sender does its own retrying in
    the background, so each call should fail within seconds (unless the user set these)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


_READY: set[str] = set()


def client_for(uri: str):
    """An MlflowClient for `uri`. A new SQLite store creates its tables on first use, and jobs
    starting at once would run those migrations together and break the file; so the first use
    in each process takes an exclusive lock beside the database (`<db>.lock`) around it."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # the client is made under the lock too: its store may migrate on creation
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates or upgrades the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)
    return client


def store_exists(uri: str) -> bool:
    """False for a SQLite or file store that is not on disk (opening it would create it)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).is_dir()
    if "://" not in uri:
        return Path(uri).is_dir()
    return True


def open_experiment(name: str, uri: str) -> tuple[MlflowClient, Experiment]:
    """A client and the experiment called `name`, or a PipelineError naming both.

    A store that is not on disk counts as missing, so a typo in the URI creates no empty store.
    """
    client = client_for(uri) if store_exists(uri) else None
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
        run = client_for(uri).get_run(value) if store_exists(uri) else None
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
