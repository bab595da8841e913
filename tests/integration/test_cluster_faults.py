"""What a shared cluster does to a run, with real processes: two trainings started on one run
folder, an output folder nobody may write to, and a rank that stops answering (SIGSTOP)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.errors import StorageError
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import list_checkpoints, read_state
from pipeline.runs.run_lock import LOCK_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _train() -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml"]


def _run_train(args: list[str], env: dict, prefix: tuple[str, ...] = ()):
    """`python -m pipeline train` with `args`, to its end; stdout and stderr captured."""
    command = [*prefix, *_train(), *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _start(command: list[str], env: dict, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """`command` started from the repository, its output read as text."""
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


def _output(overrides: list[str]) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir=")))


def _journal_steps(folder: Path) -> int:
    """Training steps the run's journal has logged so far (train.log_every=1)."""
    path = folder / "tracking" / "journal.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return sum(1 for e in lines if e["kind"] == "metrics" and "train/loss" in e["values"])


def test_two_trainings_on_one_folder_the_second_is_refused_until_the_first_ends(
    tiny_overrides, subprocess_env
):
    overrides = tiny_overrides(
        "name=shared", "train.max_steps=6", "train.checkpoint_every=2", "tracking.enabled=false"
    )
    out = _output(overrides)
    cmd = [*_train(), *overrides]
    # Started at once: exactly one trains; the other stops at once, naming the holder.
    first, second = (_start(cmd, subprocess_env) for _ in range(2))
    results = {p.pid: (p.wait(timeout=300), *p.communicate()) for p in (first, second)}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(pid for pid, (code, _, _) in results.items() if code == 0)
    _, _, refused = next(r for r in results.values() if r[0] == 2)
    lines = refused.strip().splitlines()
    assert len(lines) == 1, refused
    assert str(out) in lines[0] and "in use by another training" in lines[0]
    assert f"PID {winner} on {socket.gethostname()}" in lines[0]
    # One run's steps, once each: 6 steps in the journal, the newest checkpoint at 6.
    assert _journal_steps(out) == 6
    assert [read_state(c).step for c in list_checkpoints(out)][-1] == 6

    # A holder killed with SIGKILL frees the folder (the kernel drops its lock).
    longer = [*overrides[:-1], "train.max_steps=400"]
    holder = subprocess.Popen(
        [*_train(), *longer],
        env=subprocess_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while _journal_steps(out) <= 6:
        assert holder.poll() is None and time.time() < deadline
        time.sleep(0.1)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    holder.kill()
    holder.wait()
    after = _run_train([*overrides[:-1], "train.max_steps=7"], subprocess_env)
    assert after.returncode == 0, after.stderr[-2000:]
    assert "resumed from" in after.stdout


def test_an_output_folder_that_cannot_be_written_stops_before_anything_is_built(
    tiny_overrides, monkeypatch, tmp_path
):
    import pipeline.data

    def built(*args, **kwargs):
        raise AssertionError("the loaders were built before the folder was checked")

    monkeypatch.setattr(pipeline.data, "build_loaders", built)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    from pipeline.training import Trainer

    overrides = tiny_overrides("tracking.enabled=false")
    with pytest.raises(StorageError, match=rf"train\.output_dir {blocker}/run: cannot write"):
        Trainer(load_recipe(None, [*overrides, f"train.output_dir={blocker}/run"]))


def test_a_folder_without_write_permission_is_one_line_and_exit_4(
    tiny_overrides, subprocess_env, tmp_path
):
    shared = tmp_path / "labmate"
    shared.mkdir(mode=0o555)  # a labmate's folder: readable, not writable by us
    overrides = [*tiny_overrides("tracking.enabled=false"), f"train.output_dir={shared}/run"]
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes anywhere unless it drops the capability to
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder unwritable")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    done = _run_train(overrides, subprocess_env, prefix)
    assert done.returncode == 4, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: train.output_dir {shared}/run: cannot write there (Permission denied); choose "
        "another folder or fix its permission or quota"
    ]


def _children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children() if "pipeline" in " ".join(p.cmdline())]


def test_a_stopped_rank_ends_the_others_with_exit_5_and_a_requeue_marker(
    tiny_overrides, subprocess_env
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = tiny_overrides(
        "name=hung",
        "train.max_steps=2000",
        "train.collective_timeout_minutes=0.1",  # 6 s
        "tracking.enabled=false",
    )
    out = _output(overrides)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "pipeline",
        "train",
        "--recipe",
        "recipes/demo/baseline.yaml",
        *overrides,
    ]
    launcher = _start(cmd, subprocess_env, stderr=subprocess.STDOUT)
    stopped = None
    try:
        deadline = time.time() + 180
        while _journal_steps(out) < 3:
            assert launcher.poll() is None, launcher.communicate()[0][-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        ranks = {int(p.environ()["RANK"]): p for p in _children(launcher.pid)}
        assert sorted(ranks) == [0, 1]
        stopped = ranks[1]
        stopped.send_signal(signal.SIGSTOP)
        since = time.time()
        ranks[0].wait(timeout=60)
        waited = time.time() - since
        stopped.kill()
        log = launcher.communicate(timeout=120)[0]
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        launcher.kill()
    assert waited < 40, waited  # the 6 s timeout, not torch's 30 minutes
    lines = [x for x in log.splitlines() if "a collective with the other ranks failed" in x]
    assert lines and lines[0].startswith("error: rank 0: "), log[-3000:]
    assert "exitcode  : 5" in log or "exitcode: 5" in log, log[-3000:]
    assert (out / "RANK_LOST").read_text().startswith("rank ")
