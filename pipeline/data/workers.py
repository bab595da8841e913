"""Worker processes for the data path: the header check and DALI's augmentation draws, and
what every data worker, the torchvision backend's DataLoader workers too, does at its start.

Forked, as DataLoader workers are, so that a script needs no `__main__` guard; each is held to
one torch thread and asks the kernel to end it when its parent dies, so a trainer killed with
SIGKILL (a Slurm preemption, an OOM kill) leaves no orphans behind. They run only file reads,
NumPy and CPU torch, never CUDA.

Workers ignore the signals that ask the trainer to stop (`STOP_SIGNALS`). `scancel`, a Slurm time
limit, `PreemptMode=REQUEUE` and a Ctrl-C send them to every process of the job step or terminal,
and a worker that died of them first would break the trainer's next batch before it could
checkpoint; the trainer's own exit, or its death, still ends them.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import multiprocessing.util  # registers its exit handler before `kill_daemonic_workers_at_exit`
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold `STOP_SIGNALS` in the calling thread while it forks workers: a child then inherits
    them held until `detach_worker` ignores them, so a signal to the whole group in between cannot
    kill it. The calling process gets its own copy when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def detach_worker(parent: int) -> None:
    """In a worker forked by `parent`: ignore `STOP_SIGNALS` and die with `parent`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the fork; now dropped
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@functools.cache
def kill_daemonic_workers_at_exit() -> None:
    """At exit, kill the daemonic workers still running (a DataLoader's, when an exception ends
    the trainer): multiprocessing's own exit handler ends them with the SIGTERM they ignore, then
    waits for them forever. Registered after that handler, this one runs before it."""
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these as crashes
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _worker_init(parent: int) -> None:
    import torch

    torch.set_num_threads(1)
    detach_worker(parent)


def start_workers(count: int) -> ProcessPoolExecutor:
    """A pool of `count` worker processes, all forked now from the calling thread."""
    context = multiprocessing.get_context("fork")
    with stop_signals_held():
        pool = ProcessPoolExecutor(
            count, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
        )
        wait([pool.submit(int) for _ in range(count)])
    return pool
