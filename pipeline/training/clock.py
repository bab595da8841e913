"""Where a run is and what its next batch is: epoch, step, step in the epoch (the checkpointed
`TrainerState`), the optimiser step a batch belongs to, and the lr schedule's index.

A step is one loader batch (a micro-batch); `accum` of them make one optimiser step. An optimiser
step never spans an epoch's end or the run's end, so the last one of an epoch may be shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.runs.checkpoints import TrainerState
from pipeline.training.step import MicroBatch


@dataclass
class Clock:
    """The run's position (`state`) and the counts that place a batch in it."""

    state: TrainerState
    steps_per_epoch: int  # loader batches (micro-batches) per epoch
    accum: int  # micro-batches per optimiser step
    total_steps: int

    @property
    def updates_per_epoch(self) -> int:
        """Optimiser steps per epoch: the last one may have fewer micro-batches."""
        return math.ceil(self.steps_per_epoch / self.accum)

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    @property
    def epoch_done(self) -> bool:
        return self.state.step_in_epoch >= self.steps_per_epoch

    @property
    def epochs_done(self) -> float:
        """Epochs completed, with the current one's fraction."""
        return self.state.epoch + self.state.step_in_epoch / max(1, self.steps_per_epoch)

    def steps_left_in_epoch(self) -> int:
        """Batches the current epoch still trains (fewer when the run ends inside it)."""
        in_epoch = self.steps_per_epoch - self.state.step_in_epoch
        return min(in_epoch, self.total_steps - self.state.step)

    def lr_index(self) -> int:
        """The schedule's position: optimiser steps since the run began."""
        return self.state.epoch * self.updates_per_epoch + self.state.step_in_epoch // self.accum

    def micro_batch(self) -> MicroBatch:
        """The next batch's place in its optimiser step: how many micro-batches the step has, and
        whether this one ends it (then the loss over the step is the mean of those it has)."""
        first = self.state.step_in_epoch // self.accum * self.accum  # in this epoch
        run_left = self.total_steps - (self.state.step - (self.state.step_in_epoch - first))
        count = min(self.accum, self.steps_per_epoch - first, run_left)
        return MicroBatch(count, self.state.step_in_epoch + 1 - first == count)

    def tick(self) -> None:
        """One batch trained."""
        self.state.step += 1
        self.state.step_in_epoch += 1

    def crossed(self, every: int, micro: MicroBatch) -> bool:
        """Whether the optimiser step that `micro` just ended passed a multiple of `every`
        micro-batches (one micro-batch per step: step % every == 0)."""
        return self.state.step // every > (self.state.step - micro.count) // every

    def roll_epoch(self) -> bool:
        """Start the next epoch if this one is complete; whether it was."""
        if not self.epoch_done:
            return False
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        return True
