"""Sends a run's journal to MLflow, in order, from where it last got to.

`send_pending` delivers what the journal holds beyond the offset recorded in `sent.json` (next to
the journal) and records the new offset after each call that MLflow accepted, so a send that is
cut off resumes where it stopped. The run is created at MLflow on the first `start` entry and
its id recorded at once, so requeues and later syncs continue the same run. Used by the
tracker's background thread during training, and by `python -m pipeline sync-tracking`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.runs.journal import read_entries
from pipeline.runs.store import (
    absolute_uri,
    client_for,
    experiment_id,
    quick_failing_client_settings,
)

STATE = "sent.json"
_METRICS_PER_CALL = 1000  # MLflow's log_batch limits
_PARAMS_PER_CALL = 100


@dataclass
class SendState:
    """How far a journal has been delivered, and to which MLflow run."""

    run_id: str | None = None
    offset: int = 0
    uri: str | None = None

    @classmethod
    def read(cls, folder: Path) -> SendState:
        try:
            return cls(**json.loads((folder / STATE).read_text()))
        except (OSError, ValueError, TypeError):
            return cls()

    def write(self, folder: Path) -> None:
        tmp = folder / f".tmp-{STATE}"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, folder / STATE)


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _send_start(client, entry: dict, state: SendState, folder: Path) -> None:
    from pipeline.runs.provenance import DIFF_FOLDER, source_tags

    if state.run_id is None:
        exp = experiment_id(entry["experiment"], state.uri)
        tags = entry["tags"]
        if "source" in entry:  # MLflow's source tags; journals written before them have none
            tags = {**source_tags(entry["source"]), **tags}
        run = client.create_run(exp, start_time=entry["time"], tags=tags, run_name=entry["name"])
        state.run_id = run.info.run_id
        state.write(folder)  # before anything else: a retry must not create a second run
    params = _params(entry["params"])
    for i in range(0, len(params), _PARAMS_PER_CALL):
        client.log_batch(state.run_id, params=params[i : i + _PARAMS_PER_CALL])
    client.log_text(state.run_id, entry["recipe"], "recipe.yaml")
    if entry.get("code_diff") and Path(entry["code_diff"]).is_file():  # a dirty tree's diff
        client.log_artifact(state.run_id, entry["code_diff"], artifact_path=DIFF_FOLDER)


def _send_metrics(client, run_id: str, entries: list[dict]) -> None:
    from mlflow.entities import Metric

    metrics = [
        Metric(key, float(value), e["time"], e["step"])
        for e in entries
        for key, value in e["values"].items()
    ]
    for i in range(0, len(metrics), _METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[i : i + _METRICS_PER_CALL])


def _send_one(client, entry: dict, state: SendState, folder: Path) -> None:
    kind = entry["kind"]
    if kind == "start":
        _send_start(client, entry, state, folder)
    elif kind == "resume":
        client.update_run(state.run_id, status="RUNNING")
    elif kind == "artifact":
        if Path(entry["path"]).is_file():
            client.log_artifact(state.run_id, entry["path"], artifact_path=entry.get("folder"))
    elif kind == "status":
        if entry.get("reason"):
            client.set_tag(state.run_id, "failure", entry["reason"][:5000])
        client.set_terminated(state.run_id, status=entry["status"], end_time=entry["time"])
    else:
        raise ValueError(f"{folder}: unknown journal entry kind {kind!r}")


def send_pending(folder: Path, uri: str, stop=None) -> int:
    """Deliver the journal in `folder` beyond what was delivered before; the entries sent.

    Raises whatever MLflow raises (the caller retries); what was delivered stays recorded.
    `stop`, a threading.Event, ends the loop between calls. A line that is not an entry is
    stepped over (read_entries says which), so what follows it is delivered, once.
    """
    quick_failing_client_settings()
    uri = absolute_uri(uri)  # recorded: it names the same store from any working directory
    state = SendState.read(folder)
    if state.uri is not None and absolute_uri(state.uri) != uri:
        raise ValueError(
            f"{folder}: this run was tracked at {state.uri}, not {uri}; give that URI (or move "
            f"{folder / STATE} away to send the whole journal to {uri} as a new run)"
        )
    state.uri = uri
    client = client_for(uri)
    sent = 0
    pending: list[dict] = []
    end = state.offset

    def flush_metrics() -> None:
        nonlocal sent
        if pending:
            _send_metrics(client, state.run_id, pending)
            sent += len(pending)
            pending.clear()
            state.offset = end
            state.write(folder)

    def step_over(offset: int) -> None:
        nonlocal end
        end = offset

    for offset, entry in read_entries(folder / "journal.jsonl", state.offset, step_over):
        if stop is not None and stop.is_set():
            break
        if entry["kind"] == "metrics" and state.run_id is not None:
            pending.append(entry)
            end = offset
            if len(pending) >= 200:
                flush_metrics()
            continue
        flush_metrics()
        if state.run_id is None and entry["kind"] != "start":
            raise ValueError(f"{folder}: journal does not begin with a start entry")
        _send_one(client, entry, state, folder)
        sent += 1
        end = state.offset = offset
        state.write(folder)
    flush_metrics()
    if end != state.offset:  # only lines that are not entries since the last one sent
        state.offset = end
        state.write(folder)
    return sent


def pending_bytes(folder: Path) -> int:
    """How much of the journal is not delivered yet (0: all of it is)."""
    journal = folder / "journal.jsonl"
    size = journal.stat().st_size if journal.exists() else 0
    return max(0, size - SendState.read(folder).offset)
