"""A SIGTERM to the whole process group, as `scancel`, a Slurm time limit and PreemptMode=REQUEUE
send it, reaches the data workers too: they must outlive it, so that the trainer checkpoints at
its next check and exits 3 within Slurm's KillWait (30 s by default), leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.runs.checkpoints import list_checkpoints, read_state
from pipeline.runs.journal import read_entries
from pipeline.training.preempt import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
KILL_WAIT = 30.0  # Slurm's default: SIGKILL follows SIGTERM after this many seconds
TRAIN = [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml"]


def _logged_steps(out_dir: Path) -> int:
    """The last step with metrics in the run's tracking journal (0 before the first)."""
    journal = out_dir / "tracking" / "journal.jsonl"
    steps = [e["step"] for _, e in read_entries(journal) if e["kind"] == "metrics"]
    return max(steps, default=0)


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


# The torchvision backend's workers are the DataLoader's (data.num_threads); DALI's are the
# processes drawing the augmentation (data.plan_workers), as DALI itself starts none on the CPU.
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_sigterm_to_the_process_group_checkpoints_and_exits_3(
    backend, tiny_overrides, subprocess_env, tmp_path
):
    overrides = tiny_overrides(
        f"name=group_{backend}",
        f"data.backend={backend}",
        "data.plan_workers=1",
        "train.max_steps=100000",
        "train.preempt_check_every=20",  # the default: steps run on after the signal
        "tracking.experiment=t_group_signals",
    )
    out_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir")))
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*TRAIN, *overrides],
            env=subprocess_env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group, as a Slurm step's
        )
    try:
        deadline = time.monotonic() + 120
        while _logged_steps(out_dir) < 3:
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training steps logged"
            time.sleep(0.1)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, f"{backend}: no worker processes to receive the signal"

        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=KILL_WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = stderr.read_text()
    assert status == EXIT_PREEMPTED, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    state = read_state(list_checkpoints(out_dir)[-1])
    assert state.step >= 3 and state.step % 20 == 0, state  # saved at a check after the signal
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers left after the trainer exited: {alive}"
    assert not _group(proc.pid), f"processes left in the group: {_group(proc.pid)}"


def test_an_exception_exit_does_not_wait_for_a_worker_deaf_to_sigterm(subprocess_env):
    # Ctrl-C (or any exception) ending the trainer leaves the DataLoader's persistent iterator
    # alive in the traceback, so multiprocessing's exit handler ends its daemonic worker with
    # SIGTERM and waits for it: the worker ignores that, and the exit must not hang on it.
    script = """
import functools, multiprocessing, os
import torch.utils.data
from pipeline.data.torchvision_loader import _worker_init
from pipeline.data.workers import kill_daemonic_workers_at_exit

kill_daemonic_workers_at_exit()
loader = torch.utils.data.DataLoader(
    range(64), num_workers=1, persistent_workers=True,
    worker_init_fn=functools.partial(_worker_init, os.getpid()),
)
batches = iter(loader)
next(batches)
print(multiprocessing.active_children()[0].pid, flush=True)
raise KeyboardInterrupt
"""
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == -signal.SIGINT, run.stderr[-3000:]
    assert run.stderr.count("Traceback") == 1, run.stderr[-3000:]  # the KeyboardInterrupt's
    assert not psutil.pid_exists(int(run.stdout))
