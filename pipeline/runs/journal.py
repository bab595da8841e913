"""A run's tracking journal: every parameter, metric, artifact and status change of the run,
appended to a JSON-lines file in its output folder before anything is sent anywhere.

The journal is the run's record: MLflow receives a copy (runs/tracking.py sends it in order,
remembering how far it got), curves are drawn from it, and `compare` reads it when a run was
trained without MLflow. A line reaches the operating system as it is written, so a killed
process loses nothing it logged; a line cut short by a crash is ignored.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Journal", "RunRecord", "read_entries", "read_run"]

FILE = "journal.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity; they are kept as strings and read back as floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def read_entries(path: Path, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(offset after the line, entry)` for each complete line from byte `offset` on."""
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            if not line.endswith(b"\n"):
                return  # being written, or cut short by a crash
            offset += len(line)
            yield offset, json.loads(line)


@dataclass
class RunRecord:
    """What a run's journal says about it: its name, params and latest metrics, and how each
    metric went (for tables and plots of runs that were tracked without MLflow)."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def read_run(folder: Path) -> RunRecord:
    """The record of the journal in `folder` (a run's `tracking/` folder)."""
    record: RunRecord | None = None
    steps: dict[str, dict[int, float]] = {}
    for _, entry in read_entries(folder / FILE):
        if entry["kind"] == "start":
            record = RunRecord(entry["name"], entry["params"])
        elif entry["kind"] == "metrics":
            for key, value in entry["values"].items():
                steps.setdefault(key, {})[entry["step"]] = float(value)
    if record is None:
        raise ValueError(f"{folder / FILE}: no run start in the journal")
    record.history = {key: sorted(points.items()) for key, points in steps.items()}
    record.metrics = {key: points[-1][1] for key, points in record.history.items()}
    return record


class Journal:
    """Append-only: `append(kind, **fields)`; safe to call from several threads."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / FILE
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._write_failed = False

    def append(self, kind: str, **fields: Any) -> None:
        entry = {"kind": kind, "time": int(time.time() * 1000), **fields}
        if "values" in entry:
            entry["values"] = {k: _clean(v) for k, v in entry["values"].items()}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)  # one write of one line: appended whole
            except OSError as exc:  # a full disk must not stop training; say so once
                if not self._write_failed:
                    print(
                        f"warning: tracking journal {self.path}: cannot append ({exc.strerror});"
                        " entries are lost until it can",
                        file=sys.stderr,
                        flush=True,
                    )
                self._write_failed = True
            else:
                self._write_failed = False

    def empty(self) -> bool:
        return self.path.stat().st_size == 0

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric, the last value per step, in step order."""
        points = {
            entry["step"]: float(entry["values"][key])
            for _, entry in read_entries(self.path)
            if entry["kind"] == "metrics" and key in entry["values"]
        }
        return sorted(points.items())

    def close(self) -> None:
        os.close(self._fd)
