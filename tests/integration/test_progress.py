"""Progress of a run (pipeline/training/progress.py): the line's format, when lines are due, the
ETA and img/s against hand-worked clocks; then a real run with stdout a pipe (a Slurm log): plain
lines and no carriage return, `train/epoch` in the journal, and a finished run's re-run showing
its recorded results."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.training.progress import RunProgress, format_duration, format_line, progress_mode

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (129_120.0, "1d 11h 52m"),  # 86,400 + 11 × 3,600 + 52 × 60
        (90_061.0, "1d 1h 01m"),
        (3_725.0, "1h 02m"),
        (65.0, "1m 05s"),
        (42.9, "42s"),  # rounded down
        (0.0, "0s"),
        (None, "–"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_line():
    line = format_line("alignmixup", 3, 300, 3_700, 375_300, 4.8123, 0.1, 2_890.4, 129_120.0)
    assert line == (
        "[alignmixup] epoch 3/300  step 3,700/375,300 (1.0%)  loss 4.812  lr 0.1  2,890 img/s  "
        "ETA 1d 11h 52m"
    )
    assert format_line("r", 1, 2, 1, 100, None, None, None, None) == (
        "[r] epoch 1/2  step 1/100 (1.0%)  loss –  lr –  – img/s  ETA –"
    )


def _progress(lines: list[str], total: int, per_epoch: int, log_seconds: float) -> RunProgress:
    """Lines into `lines`; 32 images a step; created at t = 0."""
    return RunProgress("r", total, per_epoch, 32, log_seconds, "lines", 0.0, lines.append)


def test_a_line_every_log_seconds_with_eta_and_img_per_s_over_the_last_interval():
    lines: list[str] = []
    progress = _progress(lines, total=100, per_epoch=50, log_seconds=10)
    progress.start_epoch(0, 50, now=0.0)
    for step in range(1, 11):  # 1 s a step; the first one (warm-up) is not counted
        progress.step(step, now=float(step))
    # due at t = 10: 9 counted steps in 9 s; 90 steps left at 1 s
    assert lines == ["[r] epoch 1/2  step 10/100 (10.0%)  loss –  lr –  32 img/s  ETA 1m 30s"]
    progress.note(2.5, 0.05)  # the trainer logged
    for step in range(11, 31):  # 0.5 s a step: t = 10.5 … 20, due again at t = 20 (step 30)
        progress.step(step, now=10 + 0.5 * (step - 10))
    # img/s: 20 steps × 32 in 10 s; ETA: 70 left × (9 + 10) s / 29 counted = 45.9 s
    assert lines[1:] == [
        "[r] epoch 1/2  step 30/100 (30.0%)  loss 2.500  lr 0.05  64 img/s  ETA 45s"
    ]


def test_eta_leaves_out_the_first_step_and_the_time_between_epochs():
    lines: list[str] = []
    progress = _progress(lines, total=20, per_epoch=10, log_seconds=1000)
    progress.start_epoch(0, 10, now=0.0)
    progress.step(1, now=30.0)  # 30 s of compilation and loader start
    for step in range(2, 11):
        progress.step(step, now=29.0 + step)
    progress.end_epoch(now=39.5)  # a line at each epoch's end: 9 steps in 9 s counted
    progress.start_epoch(1, 10, now=100.0)  # 60 s of validation and checkpoint
    for step in range(11, 16):
        progress.step(step, now=90.0 + step)
    assert progress.eta() == pytest.approx(5.0)  # 5 left at 1 s
    for step in range(16, 21):
        progress.step(step, now=90.0 + step)
    progress.end_epoch(now=110.5)
    assert lines == [
        "[r] epoch 1/2  step 10/20 (50.0%)  loss –  lr –  32 img/s  ETA 10s",
        "[r] epoch 2/2  step 20/20 (100.0%)  loss –  lr –  32 img/s  ETA 0s",
    ]


def test_an_epochs_end_line_is_not_repeated_and_restarts_the_interval():
    lines: list[str] = []
    progress = _progress(lines, total=10, per_epoch=5, log_seconds=5)
    progress.start_epoch(0, 5, now=0.0)
    for step in range(1, 6):
        progress.step(step, now=float(step))  # due at t = 5: step 5, the epoch's last
    progress.end_epoch(now=5.2)  # already said at this step
    progress.start_epoch(1, 5, now=7.0)
    for step in range(6, 11):
        progress.step(step, now=2.0 + step)  # t = 8 … 12: due at t = 10 (step 8)
    progress.end_epoch(now=12.5)
    assert [int(re.search(r"step (\d+)/", x)[1]) for x in lines] == [5, 8, 10]


def test_off_writes_nothing_and_the_bar_carries_the_runs_eta(monkeypatch):
    lines: list[str] = []
    off = RunProgress("r", 10, 5, 32, 0.001, "off", 0.0, lines.append)
    off.start_epoch(0, 5, now=0.0)
    for step in range(1, 6):
        off.step(step, now=float(step))
    off.end_epoch(now=6.0)
    assert lines == [] and off.eta() is None

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)  # where tqdm writes
    bar = RunProgress("r", 100, 50, 32, 0.001, "bar", 0.0, lines.append)
    bar.start_epoch(0, 50, now=0.0)
    for step in range(1, 11):
        bar.step(step, now=float(step))
    bar.note(2.5, 0.05)
    bar.end_epoch(now=10.5)
    assert lines == []  # no plain lines on a terminal
    assert "run ETA=1m 30s" in stderr.getvalue() and "loss=2.500" in stderr.getvalue()


def test_progress_mode(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    assert progress_mode(True) == "lines"
    assert progress_mode(False) == "off"


LINE = re.compile(
    r"^\[progress\] epoch (\d+)/2  step (\d+)/(\d+) \((\d+\.\d)%\)  loss (\S+)  lr (\S+)  "
    r"(\S+) img/s  ETA (\S.*)$"
)


def _table_row(text: str, name: str) -> dict[str, str]:
    """The summary table's row of run `name`, as {header: cell}."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    (row,) = [r for r in rows if r[0] == name]
    return dict(zip(rows[0], row, strict=True))


@pytest.mark.slow
def test_a_piped_run_prints_plain_lines_and_its_rerun_its_recorded_results(
    tiny_overrides, subprocess_env, tmp_path
):
    overrides = tiny_overrides(
        "name=progress",
        "data.batch_size=64",
        "optim.reference_batch=64",
        "train.epochs=2",
        "train.log_every=5",
        "train.progress=true",
        "train.log_seconds=0.2",
        "tracking.enabled=false",
    )
    cmd = [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml"]
    first = subprocess.run(
        [*cmd, *overrides], env=subprocess_env, capture_output=True, text=True, cwd=REPO
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "\r" not in first.stdout + first.stderr  # no tqdm in a log
    journal = tmp_path / "run/tracking/journal.jsonl"
    assert (
        first.stdout.splitlines()[0]
        == f"MLflow: off (tracking.enabled=false); the journal is {journal}"
    )

    entries = [json.loads(x) for x in (tmp_path / "run/tracking/journal.jsonl").open()]
    per_epoch = next(e for e in entries if e["kind"] == "start")["params"]["steps_per_epoch"]
    metrics = [e for e in entries if e["kind"] == "metrics"]
    epochs = {
        e["step"]: e["values"]["train/epoch"] for e in metrics if "train/epoch" in e["values"]
    }
    losses = [e["step"] for e in metrics if "train/loss" in e["values"]]
    assert sorted(epochs) == sorted(losses) and 2 * per_epoch in epochs
    for step, epoch in epochs.items():
        assert epoch == pytest.approx(step / per_epoch)

    found = [LINE.match(x) for x in first.stdout.splitlines() if x.startswith("[progress]")]
    assert len(found) >= 2 and all(found), first.stdout
    steps = [int(m[2]) for m in found]
    assert steps == sorted(set(steps)) and {per_epoch, 2 * per_epoch} <= set(steps)
    assert {int(m[3]) for m in found} == {2 * per_epoch}
    last = found[-1]
    assert last[4] == "100.0" and last[8] == "0s" and float(last[5]) > 0
    assert float(last[7].replace(",", "")) > 0

    again = subprocess.run(
        [*cmd, *overrides], env=subprocess_env, capture_output=True, text=True, cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stdout and "\r" not in again.stdout + again.stderr
    (top1,) = [e["values"]["final/top1_err"] for e in metrics if "final/top1_err" in e["values"]]
    row = _table_row(again.stdout, "progress")
    assert row["top-1 err (%)"] == f"{top1:.2f}" and row["steps"] == str(2 * per_epoch)
    assert "–" not in (row["best (%)"], row["top-5 err (%)"], row["ms/batch"], row["img/s"])
