"""A run's tracking journal: every parameter, metric, artifact and status change of the run,
appended to a JSON-lines file in its output folder before anything is sent anywhere.

The journal is the run's record: MLflow receives a copy (runs/tracking.py sends it in order,
remembering how far it got), curves are drawn from it, and `compare` reads it when a run was
trained without MLflow. A line reaches the operating system as it is written, so a killed
process loses nothing it logged. A last line cut short by a crash (or a full disk) is cut off when
the journal is next opened, so the next entry does not land on it; a line that is not an entry
is said once, with its file and line number, and skipped by every reader.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Journal", "RunRecord", "read_entries", "read_run"]

FILE = "journal.jsonl"
_CHUNK = 1 << 16
_reported: set[tuple[str, int]] = set()  # bad lines said in this process: (file, end offset)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity; they are kept as strings and read back as floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _parse(line: bytes) -> dict[str, Any]:
    """The entry on `line`; ValueError saying why if it is not one."""
    try:
        entry = json.loads(line)  # UnicodeDecodeError (a ValueError) for invalid UTF-8
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at column {exc.colno}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
        raise ValueError('not an object with a "kind"')
    return entry


def _line_number(path: Path, start: int) -> int:
    """The number of the line that begins at byte `start` of `path`."""
    count = 0
    with open(path, "rb") as fh:
        while start > 0:
            chunk = fh.read(min(_CHUNK, start))
            count += chunk.count(b"\n")
            start -= len(chunk)
    return count + 1


def read_entries(
    path: Path, offset: int = 0, skipped: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(offset after the line, entry)` for each complete line from byte `offset` on.

    A line that is not an entry is said on stderr (once per process), naming the file and line,
    and skipped; `skipped(offset after it)` lets a reader that records offsets step past it.
    """
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            if not line.endswith(b"\n"):
                return  # being written, or cut short by a crash
            start, offset = offset, offset + len(line)
            try:
                entry = _parse(line)
            except ValueError as exc:
                if (str(path), offset) not in _reported:
                    _reported.add((str(path), offset))
                    why = str(exc).splitlines()[0][:200]
                    _warn(f"{path}:{_line_number(path, start)}: not an entry ({why}); skipped")
                if skipped is not None:
                    skipped(offset)
                continue
            yield offset, entry


def _warn(text: str) -> None:
    print(f"warning: tracking journal {text}", file=sys.stderr, flush=True)


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
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        self._write_failed = False
        self._cut_torn_line()

    def _cut_torn_line(self) -> None:
        """Cut off a last line that a crash left without its newline, as write-ahead logs do:
        the next entry would be glued onto it, making a line no reader can parse."""
        size = end = os.fstat(self._fd).st_size
        while end > 0:
            start = max(0, end - _CHUNK)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            os.ftruncate(self._fd, end)
            _warn(f"{self.path}: last line cut short (by a crash?); its {size - end} bytes dropped")

    def append(self, kind: str, **fields: Any) -> None:
        entry = {"kind": kind, "time": int(time.time() * 1000), **fields}
        if "values" in entry:
            entry["values"] = {k: _clean(v) for k, v in entry["values"].items()}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            why = self._write(line)
            if why is not None and not self._write_failed:  # a full disk must not stop training
                _warn(f"{self.path}: cannot append ({why}); entries are lost until it can")
            self._write_failed = why is not None

    def _write(self, line: bytes) -> str | None:
        """Append `line` whole (one write of one line) or none of it; why not, if not."""
        try:
            written = os.write(self._fd, line)
            if written < len(line):  # the disk filled up midway: no torn line to glue onto
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                return f"only {written} of {len(line)} bytes written, taken back"
        except OSError as exc:
            return exc.strerror
        return None

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
