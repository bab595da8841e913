"""The run's progress on the console (main process only), with the whole run's ETA.

On a terminal: the epoch's tqdm bar, its postfix the last logged loss and lr and the run's ETA.
Elsewhere (a Slurm log, a pipe): no bar, whose carriage returns fill a log, but one plain line
every `train.log_seconds` (once a step has been timed) and at each epoch's end, such as

[alignmixup] epoch 3/300  step 3,700/375,300 (1.0%)  loss 4.812  lr 0.1  2,890 img/s  ETA 1d 11h 52m

The ETA is the steps left times this process's mean seconds per step. Only time spent in steps
counts: not the time between epochs (validation, checkpoints), nor this process's first step
(compilation, the loader's start). img/s is over the steps since the previous line. The loss and
lr are those the trainer last logged (every `train.log_every` steps), so a line adds no
host-device sync. The clock is passed in (`now`), so all of it is testable without a trainer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Literal

__all__ = ["RunProgress", "format_duration", "format_line", "progress_mode"]

Mode = Literal["bar", "lines", "off"]


def progress_mode(enabled: bool) -> Mode:
    """A bar when stdout and stderr are both a terminal, plain lines otherwise, or nothing."""
    if not enabled:
        return "off"
    return "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"


def format_duration(seconds: float | None) -> str:
    """`1d 11h 52m`, `2h 05m`, `7m 30s` or `45s` (rounded down); `–` when not known yet."""
    if seconds is None:
        return "–"
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_line(
    name: str,
    epoch: int,
    epochs: int,
    step: int,
    total: int,
    loss: float | None,
    lr: float | None,
    images_per_s: float | None,
    eta_s: float | None,
) -> str:
    """One progress line; `epoch` counts from 1, `–` stands for what is not known yet."""
    return (
        f"[{name}] epoch {epoch}/{epochs}  step {step:,}/{total:,} ({100 * step / total:.1f}%)  "
        f"loss {_number(loss, '.3f')}  lr {_number(lr, '.4g')}  "
        f"{_number(images_per_s, ',.0f')} img/s  ETA {format_duration(eta_s)}"
    )


class RunProgress:
    """Counts the run's steps and their time for the ETA, and shows them: `mode` "bar" (tqdm),
    "lines" (through `write`) or "off"."""

    def __init__(
        self,
        name: str,
        total_steps: int,
        steps_per_epoch: int,
        images_per_step: int,
        log_seconds: float,
        mode: Mode,
        now: float,
        write: Callable[[str], None],
    ) -> None:
        self.name, self.total, self.mode, self.write = name, total_steps, mode, write
        self.epochs = math.ceil(total_steps / steps_per_epoch)
        self.images_per_step = images_per_step
        self.log_seconds = log_seconds
        self.next_due = now + log_seconds
        self.epoch = 1  # from 1, as shown
        self.step_now = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.counted = 0  # steps whose time is in train_s
        self.train_s = 0.0
        self._last: float | None = None  # when the previous step ended; None: not counting
        self._started = False  # this process has ended a step: later ones count
        self._mark = (0, 0.0)  # (counted, train_s) at the previous line, for its img/s
        self._written = -1  # the step of the last line
        self._bar = None

    def eta(self) -> float | None:
        """Seconds left: the steps left times the mean seconds per counted step."""
        if not self.counted:
            return None
        return (self.total - self.step_now) * self.train_s / self.counted

    def start_epoch(self, epoch: int, steps: int, now: float) -> None:
        """Epoch `epoch` (from 0) begins with `steps` steps left in it: the clock restarts, so
        the time since the last step (validation, checkpoints) is not counted."""
        self.epoch = epoch + 1
        self._last = now if self._started else None
        if self.mode == "bar":
            from tqdm import tqdm

            desc = f"{self.name} epoch {self.epoch}/{self.epochs}"
            self._bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, step: int, now: float) -> None:
        """Step `step` of the run ended at `now`: count it, and write a line if one is due."""
        if self.mode == "off":
            return
        if self._last is not None:
            self.train_s += now - self._last
            self.counted += 1
        self._last, self._started, self.step_now = now, True, step
        if self._bar is not None:
            self._bar.update(1)
        elif self.mode == "lines" and self.counted and now >= self.next_due:
            self._line(now)

    def note(self, loss: float, lr: float) -> None:
        """The loss and lr the trainer just logged; on the bar with the run's ETA."""
        self.loss, self.lr = loss, lr
        if self._bar is not None:
            eta = format_duration(self.eta())
            self._bar.set_postfix({"loss": f"{loss:.3f}", "lr": f"{lr:.4g}", "run ETA": eta})

    def end_epoch(self, now: float) -> None:
        """The epoch (or the run) stopped: close the bar, or write a line unless one was just
        written at this step."""
        self.close()
        if self.mode == "lines" and self._written != self.step_now:
            self._line(now)

    def close(self) -> None:
        """Close the bar, if any (the run stops mid-epoch: preemption)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, now: float) -> None:
        steps, seconds = self.counted - self._mark[0], self.train_s - self._mark[1]
        speed = steps * self.images_per_step / seconds if steps and seconds > 0 else None
        self.write(
            format_line(self.name, self.epoch, self.epochs, self.step_now, self.total,
                        self.loss, self.lr, speed, self.eta())
        )  # fmt: skip
        self._mark, self._written = (self.counted, self.train_s), self.step_now
        self.next_due = now + self.log_seconds
