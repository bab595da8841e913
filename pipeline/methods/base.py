"""What every mixing method shares: its output, its base class, profiler ranges and draws.

A method turns one batch into a loss. It is called inside the training step's autocast as
`method(model, images, labels, rng)`; `rng` is a CPU generator seeded from (seed, step), the same
on every rank, and a method takes every random choice from it, so a resumed step draws what the
first attempt drew. λ always comes from `rng`, so every rank mixes with the same λ; the other
choices (partner, layer, direction, CutMix box) come from `choice_generator(rng)`: `rng` itself
under `method.draws: global` (one draw for the global batch), a generator of this rank's own
under `per_rank` (one draw per GPU's chunk, as the authors' DataParallel run; docs/mixing.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.profiler import record_function

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, MethodSettings, ModelConfig
from pipeline.models import MixNet, build_model

__all__ = [
    "Method",
    "MethodContext",
    "MethodOutput",
    "MixSettings",
    "ModelNeeds",
    "coin",
    "uniform_choice",
]


class MixSettings(MethodSettings):
    """Settings of a method that mixes pairs: λ ~ Beta(α, α)."""

    alpha: float = Field(2.0, gt=0, description="λ ~ Beta(α, α)")
    draws: Literal["global", "per_rank"] = Field(
        "global",
        description="partner, layer, direction, box: one draw per step for the global batch, "
        "or one per rank (λ is always shared); docs/mixing.md",
    )


@dataclass(frozen=True)
class MethodContext:
    """What a method knows of its run besides its own settings, the same for every method."""

    rank: int = 0  # the process's global rank: what `draws: per_rank` draws apart
    label_smoothing: float = 0.0  # optim.label_smoothing, for every cross-entropy
    num_classes: int | None = None  # the classifier's classes (None: not known, as in tests)
    mean: tuple[float, ...] = IMAGENET_MEAN  # data.mean: the images come normalised by these
    std: tuple[float, ...] = IMAGENET_STD  # data.std


@dataclass(frozen=True)
class ModelNeeds:
    """What a method needs of its model, decided by its settings alone, so that the run can
    read it before the method exists (DDP's unused-parameter search) and the model is built
    with it."""

    embedding: bool = False  # f after the features (the model's `embed`/`moments`)
    decoder: bool = False  # f and the decoder (AlignMixup/AE)
    # Parameter-name prefixes that may get no gradient in a step; non-empty switches DDP's
    # find_unused_parameters on (which costs a graph traversal per step).
    unused_parameters: tuple[str, ...] = ()


@dataclass
class MethodOutput:
    """The loss to back-propagate, the logits it came from, and detached scalars to log."""

    loss: Tensor
    logits: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def uniform_choice(options: list | tuple, rng: torch.Generator):
    """One of `options`, drawn from `rng` (no device involved)."""
    return options[int(torch.randint(len(options), (1,), generator=rng))]


def rank_seed(step_seed: int, rank: int) -> int:
    """A seed for one rank's draws of one step: the ranks differ, a resumed step repeats."""
    return int(np.random.SeedSequence([step_seed, rank]).generate_state(1, np.uint64)[0])


def coin(p: float, rng: torch.Generator) -> bool:
    """True with probability `p`, drawn from `rng`."""
    return bool(torch.rand((), generator=rng) < p)


class Method:
    """Base class of a registered method (see pipeline/methods/registry.py).

    A subclass sets `Settings` (its pydantic settings, a `MethodSettings` subclass), says what
    it needs of the model in `needs` (nothing, by default), may check the built model in
    `check_model`, and implements `__call__`. The trainer reads nothing else.
    """

    name: ClassVar[str] = ""  # set by @register_method
    Settings: ClassVar[type[MethodSettings]] = MethodSettings

    def __init__(self, settings: MethodSettings, context: MethodContext | None = None) -> None:
        if not isinstance(settings, self.Settings):
            raise TypeError(
                f"{type(self).__name__} takes {self.Settings.__name__}, got {type(settings)}"
            )
        self.settings = settings
        self.context = context or MethodContext()
        self.range_prefix = self.name  # profiler ranges are `<range_prefix>/<section>`

    @classmethod
    def needs(cls, settings: MethodSettings) -> ModelNeeds:
        """What the model must have for a method with `settings` (no instance needed)."""
        return ModelNeeds()

    def section(self, name: str) -> AbstractContextManager[object]:
        """A profiler range `<method>/<name>` for `profile`; no op at all when none runs."""
        # torch's own flag for this check (inductor reads it too): a range would cost an op
        # through the dispatcher on every step of training.
        if not torch.autograd.profiler._is_profiler_enabled:
            return nullcontext()
        return record_function(f"{self.range_prefix}/{name}")

    def choice_generator(self, rng: torch.Generator) -> torch.Generator:
        """Where this step's choices other than λ come from: `rng` under `draws: global`; under
        `per_rank`, a generator seeded from one draw of `rng` and this rank, so the ranks'
        choices differ while a resumed step (same seed, step, rank) draws the same again."""
        if getattr(self.settings, "draws", "global") == "global":
            return rng
        step_seed = int(torch.randint(2**62, (1,), generator=rng))
        return torch.Generator().manual_seed(rank_seed(step_seed, self.context.rank))

    def build_model(self, cfg: ModelConfig, num_classes: int) -> MixNet:
        """The model this method trains: `cfg`'s backbone, with what the method needs."""
        needs = self.needs(self.settings)
        model = build_model(cfg, num_classes, autoencoder=needs.decoder, embedding=needs.embedding)
        self.check_model(model)
        return model

    def check_model(self, model: MixNet) -> None:
        """Raise RecipeError, naming the key, when a setting does not fit the model."""

    def clean_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on unmixed labels."""
        smoothing = self.context.label_smoothing
        return nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)

    def __call__(
        self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator
    ) -> MethodOutput:
        raise NotImplementedError
