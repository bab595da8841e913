"""Preemption: a signal or a stop file asks the run to checkpoint and exit with status 3.

Slurm sends USR1 to the batch shell before the time limit (`--signal=B:USR1@...`); the shell
creates `<output_dir>/PREEMPT` and forwards the signal. Every rank polls both, and the ranks agree
through one all-reduce every `preempt_check_every` steps, so they stop at the same step.
`scancel`, a time limit and `PreemptMode=REQUEUE` send SIGTERM to every process of the job step:
the data workers ignore it (pipeline/data/workers.py), so batches keep coming until the check.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from pipeline.runs.distributed import any_rank

EXIT_PREEMPTED = 3
STOP_FILE = "PREEMPT"


class PreemptionWatch:
    """Records SIGUSR1/SIGTERM while in its `with` block and checks for the stop file."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, output_dir: str | Path) -> None:
        self.stop_file = Path(output_dir) / STOP_FILE
        self.signalled = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        self.signalled = True

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop."""
        asked = torch.tensor(self.signalled or self.stop_file.exists())
        return bool(any_rank(accelerator, asked))

    def clear(self) -> None:
        """Forget a stop request (the run has checkpointed and is about to exit)."""
        self.stop_file.unlink(missing_ok=True)
