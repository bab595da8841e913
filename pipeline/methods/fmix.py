"""FMix (Harris et al., 2020, arXiv:2002.12047): x where a thresholded low-frequency mask is 1,
x[π] elsewhere; labels weighted by the mask's mean.

λ ~ Beta(α, α) from the step's generator; the mask's random spectrum and the partners from
`choice_generator`, so a resumed step draws the same mask (docs/mixing.md).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings
from pipeline.methods.registry import register_method
from pipeline.mixing import mixed_cross_entropy, sample_mix
from pipeline.mixing.fmix import fmix
from pipeline.models import MixNet


class FMixSettings(MixSettings):
    alpha: float = Field(
        1.0, gt=0, description="λ ~ Beta(α, α); the authors' default --alpha 1 (ecs-vlc/FMix)"
    )
    decay_power: float = Field(
        3.0,
        gt=0,
        description="δ: spectrum amplitudes fall as 1/f^δ (larger: smoother, fewer blobs); the "
        "authors' default --f-decay 3",
    )


@register_method("fmix")
class FMix(Method):
    """One mask per batch, the same for every sample, as the authors' code."""

    Settings = FMixSettings

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        with self.section("mix"):
            mixed, lam = fmix(images, s.perm, s.lam, self.settings.decay_power, choices)
        logits = model(mixed)
        loss = mixed_cross_entropy(logits, labels, s.perm, lam, self.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(lam)})
