"""What every training hook shares: its output, a section timer, and the loss helpers.

A hook turns one batch into a loss. It is called inside the trainer's autocast as
`hook(model, images, labels, rng)`; `rng` is a CPU generator seeded from (seed, step), the same
on every rank, so batch-level choices (λ, which layer, which direction) agree across ranks and
are reproduced exactly on resume.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.config import MethodConfig


@dataclass
class HookOutput:
    """The loss to back-propagate, the logits it came from, and detached scalars to log."""

    loss: Tensor
    logits: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class HookTimer:
    """Wall time of named sections of a hook, for `make profile`.

    Disabled during training (it would synchronise the device); when enabled each section
    synchronises CUDA before and after, so its time is the section's own.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.totals_ms: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.totals_ms.clear()
        self.counts.clear()

    @contextmanager
    def section(self, name: str, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.totals_ms[name] += (time.perf_counter() - start) * 1e3
        self.counts[name] += 1


def uniform_choice(options: list | tuple, rng: torch.Generator):
    """One of `options`, drawn from `rng` (no device involved)."""
    return options[int(torch.randint(len(options), (1,), generator=rng))]


def coin(p: float, rng: torch.Generator) -> bool:
    """True with probability `p`, drawn from `rng`."""
    return bool(torch.rand((), generator=rng) < p)


class Hook:
    """Base class: holds the method's settings, the label smoothing and a timer."""

    needs_decoder = False

    def __init__(self, method: MethodConfig, label_smoothing: float = 0.0) -> None:
        self.method = method
        self.label_smoothing = label_smoothing
        self.timer = HookTimer()

    def clean_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on unmixed labels."""
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def __call__(
        self, model: nn.Module, images: Tensor, labels: Tensor, rng: torch.Generator
    ) -> HookOutput:
        raise NotImplementedError
