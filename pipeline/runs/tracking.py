"""Tracking that never stops or slows training: one MLflow run per training run, continued on
resume, written first to the run's journal and sent to MLflow by a background thread.

Only the main rank tracks. `log` appends one line to `<output_dir>/tracking/journal.jsonl` and
returns; a thread sends the journal in order (sender.py), retrying with back-off while the
server is away and back-filling when it answers, into the same run. At the end of a run it
waits up to `tracking.flush_timeout` seconds; what is still unsent then stays in the journal
and goes with the next start of the run or `python -m pipeline sync-tracking OUTPUT_DIR`.
With `tracking.enabled: false`, MLflow is never imported and the journal is the only record.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.errors import TrackingError
from pipeline.runs import provenance
from pipeline.runs.journal import FILE, Journal, read_entries
from pipeline.runs.sender import SendState, pending_bytes, send_pending
from pipeline.runs.store import absolute_uri, probe, resolve_tracking_uri

FOLDER = "tracking"  # inside the run's output folder
# MLflow keeps no unit per metric; every run this pipeline logs says them in its description
# (the `mlflow.note.content` tag, shown at the top of the run's page in the UI).
UNITS_NOTE = (
    "Units: every error, accuracy, calibration (ECE) and localisation metric (val/*, final/*, "
    "eval/*, eval_ema/*, wsol/*) is a percentage, 0-100. perf/msec_per_batch and msec_* are "
    "milliseconds per training step, perf/images_per_s images per second."
)
DESCRIPTION_TAG = "mlflow.note.content"


def recorded_run_id(output_dir: str | Path) -> str | None:
    """The MLflow run a run folder's journal is delivered to, if it has reached MLflow."""
    return SendState.read(Path(output_dir) / FOLDER).run_id


def recorded_tracking_uri(output_dir: str | Path) -> str | None:
    """The store a run folder's journal belongs to: the one it was delivered to, else the one its
    start entry names (the recipe's `tracking.tracking_uri` for journals older than that)."""
    folder = Path(output_dir) / FOLDER
    delivered = SendState.read(folder).uri
    if delivered is not None:
        return delivered
    first = next(read_entries(folder / FILE), None)
    if first is None or first[1]["kind"] != "start":
        return None
    start = first[1]
    return start.get("tracking_uri") or start.get("params", {}).get("tracking.tracking_uri")


class _Delivery(threading.Thread):
    """The background sender: delivers the journal whenever woken, retrying while it fails."""

    def __init__(self, folder: Path, uri: str, journal_path: Path) -> None:
        super().__init__(name="tracking-sender", daemon=True)
        self.folder, self.uri, self.journal_path = folder, uri, journal_path
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.failing: str | None = None  # why the last attempt failed, while it does

    def run(self) -> None:
        backoff = 1.0
        while True:
            self.wake.wait(timeout=backoff if self.failing else 5.0)
            self.wake.clear()
            try:
                send_pending(self.folder, self.uri)
            except Exception as exc:  # never into training: retried, and said once
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if self.failing is None:
                    _say(
                        f"tracking: MLflow at {self.uri} does not answer ({reason}); training "
                        f"goes on, and what it logs is kept in {self.journal_path} until it does"
                    )
                self.failing = reason
                backoff = min(backoff * 2, 30.0)
                continue  # also when stopping: end() waits its flush_timeout, not longer
            if self.failing is not None:
                _say(f"tracking: MLflow at {self.uri} answers again; the journal is delivered")
            self.failing, backoff = None, 1.0
            if self.stopping.is_set():
                if not pending_bytes(self.folder):
                    return
                self.wake.set()  # written while that delivery ran: send it at once


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class NewRun:
    """What a new MLflow run opens with: the tracker is told values, it reads no recipe."""

    name: str  # the run's name unless `tracking.run_name` sets one
    params: dict[str, Any]  # the recipe's flat keys and the run's facts (world_size, ...)
    recipe_yaml: str  # kept as the run's recipe.yaml
    tags: dict[str, str] = field(default_factory=dict)  # e.g. method and model
    hosts: list[str] | None = None  # of all ranks (provenance)


class Tracker:
    """The run's tracking, a no-op on other ranks than the main one (`enabled`)."""

    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.folder = Path(output_dir) / FOLDER
        self.uri = resolve_tracking_uri(self.cfg.tracking_uri)
        self.journal: Journal | None = None
        self._delivery: _Delivery | None = None
        self._system = None

    def where(self) -> str:
        """One line for the run's start: the MLflow store and experiment it logs to, or none."""
        if not self.cfg.enabled:
            return f"MLflow: off (tracking.enabled=false); the journal is {self.folder / FILE}"
        return f"MLflow store: {absolute_uri(self.uri)} (experiment {self.cfg.experiment!r})"

    @property
    def run_id(self) -> str | None:
        """The MLflow run, once the journal's start has reached MLflow."""
        return recorded_run_id(self.folder.parent) if self.enabled else None

    def start(self, run: NewRun) -> None:
        """Open the journal (a new run, `run` with its provenance, provenance.py; or a resumed
        one, which keeps what it started with) and start delivering it."""
        if not self.enabled:
            return
        if self.cfg.enabled and self.cfg.required:
            why = probe(self.uri, timeout=30.0)
            if why is not None:
                raise TrackingError(
                    f"tracking.required: MLflow at {self.uri} does not answer ({why})"
                )
        if self.cfg.enabled:
            # Imported here, once: two threads importing MLflow at once can deadlock or fail on
            # its circular imports.
            import mlflow.system_metrics.metrics.cpu_monitor
            import mlflow.tracking  # noqa: F401
        self.journal = Journal(self.folder)
        if self.journal.empty():
            diff = provenance.git_diff()
            world_size = int(run.params.get("world_size", 1))
            self.journal.append(
                "start",
                name=self.cfg.run_name or run.name,
                experiment=self.cfg.experiment,
                tags={
                    **provenance.pipeline_tags(diff, world_size, run.hosts),
                    **run.tags,
                    DESCRIPTION_TAG: UNITS_NOTE,
                },
                source=provenance.source(),  # MLflow's source tags, named by the sender
                code_diff=self._keep_diff(diff),  # sent as code/git_diff.patch
                params=run.params,
                recipe=run.recipe_yaml,
                tracking_uri=absolute_uri(self.uri),  # where `sync-tracking` sends it later
            )
        else:
            self.journal.append("resume")
        if self.cfg.system_metrics and self.cfg.enabled:  # MLflow's monitors measure
            from pipeline.runs.system_metrics import SystemSampler

            self._system = SystemSampler(self.journal, self.cfg.system_metrics_interval)
            self._system.start()
        if self.cfg.enabled:
            self._delivery = _Delivery(self.folder, self.uri, self.journal.path)
            self._delivery.start()
            self._delivery.wake.set()

    def _keep_diff(self, diff: str | None) -> str | None:
        """A dirty tree's diff written beside the journal; its path, None if clean or unwritten."""
        if not diff:
            return None
        patch = self.folder / provenance.DIFF_FILE
        try:
            patch.write_text(diff)
        except OSError as exc:  # tracking never stops training: the run goes on without it
            _say(f"tracking: {patch} not written ({exc}); the run's diff is not kept")
            return None
        return str(patch.resolve())

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.journal is not None and metrics:
            self.journal.append("metrics", step=step, values=metrics)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.journal is not None:
            self.journal.append("artifact", path=str(Path(path).resolve()), folder=folder)
            if self._delivery is not None:
                self._delivery.wake.set()

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric of this run, from its journal."""
        return self.journal.history(key) if self.journal is not None else []

    def end(self, status: str, reason: str | None = None) -> None:
        """Record the run's status (and why it failed, as the `failure` tag), then deliver for at
        most `tracking.flush_timeout` s."""
        if self.journal is None:
            return
        if self._system is not None:
            self._system.stop()
        self.journal.append("status", status=status, reason=reason)
        self._drain()
        self.journal.close()
        self.journal = None

    def deliver_leftovers(self) -> None:
        """For a run that finished while MLflow was away: deliver the rest now (bounded by
        `tracking.flush_timeout`), as the run's last start would have."""
        if self.enabled and self.cfg.enabled and pending_bytes(self.folder):
            import mlflow.tracking  # noqa: F401  (before the thread: see start)

            self._delivery = _Delivery(self.folder, self.uri, self.folder / "journal.jsonl")
            self._delivery.start()
            self._drain()

    def _drain(self) -> None:
        """Let the sender finish, waiting at most `tracking.flush_timeout` s; say what is left."""
        if self._delivery is None:
            return
        self._delivery.stopping.set()
        self._delivery.wake.set()
        self._delivery.join(timeout=self.cfg.flush_timeout)
        left = pending_bytes(self.folder)
        if left:
            _say(
                f"tracking: {left} bytes of {self.folder / 'journal.jsonl'} not yet delivered to "
                f"{self.uri}; they go with the next start of this run or with "
                f"`python -m pipeline sync-tracking {self.folder.parent}`"
            )


def sync(output_dir: str | Path, uri: str | None = None) -> tuple[int, str]:
    """Deliver a run folder's journal now (`sync-tracking`) to `uri`, by default the store the
    run recorded; the entries sent and the URI they went to."""
    folder = Path(output_dir) / FOLDER
    if not (folder / FILE).is_file():
        raise TrackingError(f"{folder}: no tracking journal (not a run folder of this pipeline?)")
    target = uri or recorded_tracking_uri(output_dir)
    if target is None:
        source = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "default"
        target = absolute_uri(resolve_tracking_uri())
        _say(
            f"tracking: {folder / FILE} records no tracking URI; sending to the {source} store, "
            f"{target} (--tracking-uri chooses)"
        )
    target = absolute_uri(target)
    try:
        return send_pending(folder, target), target
    except ValueError as exc:
        raise TrackingError(str(exc)) from None
    except Exception as exc:
        raise TrackingError(f"MLflow at {target}: {type(exc).__name__}: {exc}") from None
