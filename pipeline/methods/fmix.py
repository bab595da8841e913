"""FMix (Harris et al., 2020, arXiv:2002.12047): x where a thresholded low-frequency mask is 1,
x[π] elsewhere; labels weighted by the mask's mean.

λ ~ Beta(α, α) from the step's generator; the mask's random spectrum and the partners from
`choice_generator`, so a resumed step draws the same mask (docs/mixing.md).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import MixSettings
from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample
from pipeline.mixing.fmix import fmix


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
class FMix(PairMix):
    """One mask per batch, the same for every sample, as the authors' code."""

    Settings = FMixSettings

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        with self.section("mix"):
            return Mixed(*fmix(images, s.perm, s.lam, self.settings.decay_power, choices))
