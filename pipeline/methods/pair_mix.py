"""The base of the methods that mix images in pairs (x, x[π]) and weigh the pair's labels by λ:
input mixup, CutMix, FMix, ResizeMix, SaliencyMix. A subclass says only how it mixes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings
from pipeline.mixing import (
    MixSample,
    mixed_cross_entropy,
    per_sample_mixed_cross_entropy,
    sample_mix,
)
from pipeline.models import MixNet

__all__ = ["Mixed", "PairMix"]


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: the images, the share λ of each that is still its own (one float for the
    batch, or a (B,) tensor, one per sample), and scalars to log beside λ."""

    images: Tensor
    lam: float | Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class PairMix(Method):
    """λ ~ Beta(α, α) from the step's generator, π from `choice_generator`, then the subclass's
    `mix_images`, the model on the mixed batch and λ·CE(y) + (1 − λ)·CE(y[π])."""

    Settings = MixSettings

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        """The batch mixed with its partners x[π]; further draws come from `choices`."""
        raise NotImplementedError

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        mixed = self.mix_images(images, s, choices)
        logits = model(mixed.images)
        smoothing = self.context.label_smoothing
        if isinstance(mixed.lam, Tensor):  # one λ per sample
            lam = mixed.lam.to(images.device, torch.float32)
            loss = per_sample_mixed_cross_entropy(logits, labels, s.perm, lam, smoothing)
            lam_stat = mixed.lam.mean().float()
        else:
            loss = mixed_cross_entropy(logits, labels, s.perm, mixed.lam, smoothing)
            lam_stat = torch.tensor(mixed.lam)
        return MethodOutput(loss, logits, {"lam": lam_stat, **mixed.stats})
