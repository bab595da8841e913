"""ResizeMix (Qin et al., 2020, arXiv:2012.11101): the whole partner image, shrunk to τH × τW,
pasted at a random place; labels weighted by the patch's area.

τ ~ U(scale_min, scale_max), the paper's U(0.1, 0.8). It plays λ's part, so it comes from the
step's generator (the same on every rank); the patch's place and the partners come from
`choice_generator` (docs/mixing.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pipeline.methods.base import MixSettings
from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample
from pipeline.mixing.boxes import resizemix


class ResizeMixSettings(MixSettings):
    alpha: float = Field(
        1.0,
        gt=0,
        description="τ = scale_min + (scale_max − scale_min)·Beta(α, α); α = 1 is the paper's "
        "uniform τ",
    )
    scale_min: float = Field(
        0.1, gt=0, le=1, description="smallest side ratio τ of the patch; the paper's α = 0.1"
    )
    scale_max: float = Field(
        0.8, gt=0, le=1, description="largest side ratio τ of the patch; the paper's β = 0.8"
    )
    interpolation: Literal["bilinear", "nearest"] = Field(
        "bilinear",
        description="how the partner is shrunk: antialiased bilinear, or nearest (OpenMixup's "
        "default)",
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> ResizeMixSettings:
        # After the fields (so both are known, defaults included, and on assignment too).
        if not self.scale_min < self.scale_max:
            raise ValueError(
                f"method.scale_min ({self.scale_min}) must be less than method.scale_max "
                f"({self.scale_max}): τ ~ U(scale_min, scale_max)"
            )
        return self


@register_method("resizemix")
class ResizeMix(PairMix):
    """Each partner x[π] resized whole into one patch, pasted at one place for the batch."""

    Settings = ResizeMixSettings

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        # λ ~ Beta(α, α) is τ's draw; Beta(1, 1) is U(0, 1): the default α gives the paper's τ.
        low, high = self.settings.scale_min, self.settings.scale_max
        scale = low + (high - low) * s.lam
        with self.section("mix"):
            mixed, lam = resizemix(images, s.perm, scale, choices, self.settings.interpolation)
        return Mixed(mixed, lam, {"scale": torch.tensor(scale)})
