"""CutMix (Yun et al., 2019): a box of x[π] pasted into x, labels weighted by its area."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import MixSettings
from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample, cutmix


class CutMixSettings(MixSettings):
    alpha: float = Field(1.0, gt=0, description="λ ~ Beta(α, α); the CutMix paper's 1")


@register_method("cutmix")
class CutMix(PairMix):
    """The CutMix authors' box, its centre drawn from the step's generator; λ is corrected to
    the share of each image left unpasted (the box is clipped at the border)."""

    Settings = CutMixSettings

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        with self.section("mix"):
            return Mixed(*cutmix(images, s.perm, s.lam, generator=choices))
