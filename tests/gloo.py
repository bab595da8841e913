"""Run a worker script as two real processes joined by torch.distributed (gloo, file store)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_two_ranks(script: Path, args: list[str], timeout: float = 240) -> None:
    """Start `python script RANK *args` for ranks 0 and 1 (one torch thread each) and wait for
    both; fail with both logs unless both exit 0. The worker joins with
    `dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
