"""One training step, the same for `train` and `profile`: the method under Accelerate's autocast,
backward (scaled for fp16), optional gradient clipping, the optimiser step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.methods import Method
from pipeline.models import MixNet

__all__ = [
    "MethodRunner",
    "MicroBatch",
    "StepOutput",
    "StepSettings",
    "step_generator",
    "train_step",
]


class MethodRunner(nn.Module):
    """Runs the method inside `forward`, so DDP sees one forward per step whatever it calls."""

    def __init__(self, model: MixNet, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, images: torch.Tensor, labels: torch.Tensor, rng: torch.Generator):
        out = self.method(self.model, images, labels, rng)
        return out.loss, out.stats


@dataclass
class StepOutput:
    """The step's loss (detached, float32, still on the device) and the method's stats."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator a step's method draws from: the same on every rank and on resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass(frozen=True)
class StepSettings:
    """How every step of a run trains: gradient clipping, and the images' memory format."""

    grad_clip: float | None = None
    channels_last: bool = False


@dataclass(frozen=True)
class MicroBatch:
    """Where a batch stands in its optimiser step: one of `count` micro-batches, `last` or not."""

    count: int = 1
    last: bool = True


def train_step(
    accelerator,
    runner: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    rng: torch.Generator,
    settings: StepSettings = StepSettings(),
    micro: MicroBatch = MicroBatch(),
) -> StepOutput:
    """Train `runner` (prepared by `accelerator`, with `optimizer`) on one batch; no host sync.

    With gradient accumulation the batch is one of `micro.count` in an optimiser step: its loss
    is divided by that number, so the step follows the mean loss of its micro-batches, and only
    the last one (`micro.last`) all-reduces the gradients (DDP's no_sync before it), clips and
    steps the optimiser.
    """
    runner.train()
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with contextlib.nullcontext() if micro.last else accelerator.no_sync(runner):
        with accelerator.autocast():
            loss, stats = runner(images, labels, rng)
        accelerator.backward(loss / micro.count if micro.count > 1 else loss)
    if micro.last:
        if settings.grad_clip is not None:
            accelerator.clip_grad_norm_(runner.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss.detach().float(), {k: v.detach() for k, v in stats.items()})
