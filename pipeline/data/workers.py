"""Worker processes for the data path: the header check and DALI's augmentation draws.

Forked, as DataLoader workers are, so that a script needs no `__main__` guard; each is held to
one torch thread and asks the kernel to end it when its parent dies, so a trainer killed with
SIGKILL (a Slurm preemption, an OOM kill) leaves no orphans behind. They run only file reads,
NumPy and CPU torch, never CUDA.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, wait

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent: int) -> None:
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def start_workers(count: int) -> ProcessPoolExecutor:
    """A pool of `count` worker processes, all forked now from the calling thread."""
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(
        count, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    )
    wait([pool.submit(int) for _ in range(count)])
    return pool
