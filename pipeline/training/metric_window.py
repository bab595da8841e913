"""The steps since the last log: their losses and method stats stay on the device until a log
(every `train.log_every` steps, and at each epoch's end), where one sync checks them for
non-finite values, means the loss over ranks, and logs loss, lr, epoch and speed at the step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import TrainingError
from pipeline.runs.checkpoints import checkpoint_before
from pipeline.runs.distributed import any_rank
from pipeline.runs.tracking import Tracker
from pipeline.training.clock import Clock
from pipeline.training.progress import RunProgress
from pipeline.training.step import StepOutput


@dataclass(frozen=True)
class Timing:
    """Speed over a log window: milliseconds per batch and images per second (all ranks)."""

    msec_per_batch: float
    images_per_s: float


class MetricWindow:
    """Collects each step's output; `log()` reports them and starts a new window."""

    def __init__(
        self,
        accelerator,
        tracker: Tracker,
        progress: RunProgress,
        images_per_step: int,
        output_dir: Path,
        method_name: str,
    ) -> None:
        self.accelerator, self.tracker, self.progress = accelerator, tracker, progress
        self.images_per_step = images_per_step
        self.output_dir = output_dir
        self.method_name = method_name  # for the error of a non-finite loss
        self.last: Timing | None = None  # the latest window's speed
        self.restart(0)

    def restart(self, first_step: int) -> None:
        """A new window whose first step follows step `first_step`."""
        self.first_step = first_step
        self.losses: list[torch.Tensor] = []
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.started = time.perf_counter()

    def add(self, out: StepOutput) -> None:
        self.losses.append(out.loss)
        for key, value in out.stats.items():
            self.stats.setdefault(key, []).append(value.float())

    def log(self, clock: Clock, lr: float) -> None:
        """Log the window's mean loss, the lr, the epoch and the speed at the current step (one
        sync), and start a new window; nothing if no step was added."""
        if self.losses:
            self.check_finite(clock)
            n = len(self.losses)
            mean = float(self.accelerator.reduce(torch.stack(self.losses).mean(), reduction="mean"))
            elapsed = time.perf_counter() - self.started
            self.last = Timing(1e3 * elapsed / n, n * self.images_per_step / elapsed)
            step = clock.state.step
            metrics = {"train/loss": mean, "train/lr": lr}
            metrics["train/epoch"] = step / clock.steps_per_epoch  # val/* are logged per epoch
            metrics["perf/msec_per_batch"] = self.last.msec_per_batch
            metrics["perf/images_per_s"] = self.last.images_per_s
            self.tracker.log({**metrics, **self._stat_means()}, step)
            self.progress.note(mean, lr)
        self.restart(clock.state.step)

    def check_finite(self, clock: Clock) -> None:
        """Stop with the first non-finite step, naming the newest checkpoint saved before it
        (not simply the newest: one a resume from an older checkpoint left may be later)."""
        if not self.losses:
            return
        losses = torch.stack(self.losses)
        bad = any_rank(self.accelerator, ~torch.isfinite(losses))
        if bool(bad.any()):
            first = self.first_step + int(bad.nonzero()[0]) + 1
            last = checkpoint_before(self.output_dir, first)
            keep = f"last good checkpoint: {last}" if last else "no checkpoint was saved before it"
            raise TrainingError(
                f"non-finite loss ({float(losses[bad.nonzero()[0]])}) at step {first} "
                f"(epoch {clock.state.epoch}, method {self.method_name}); {keep}"
            )

    def _stat_means(self) -> dict[str, float]:
        """`method/<stat>`: this rank's mean over the steps that reported it (e.g. `recon` on
        the AE's clean batches only)."""
        return {f"method/{k}": float(torch.stack(v).mean()) for k, v in self.stats.items()}
