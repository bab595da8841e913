"""Input mixup (Zhang et al., 2018): λx + (1−λ)x[π], labels mixed the same way."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample, input_mixup


@register_method("input_mixup")
class InputMixup(PairMix):
    """Mix the images: λx + (1−λ)x[π], λ ~ Beta(α, α) and π drawn once per batch."""

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        with self.section("mix"):
            return Mixed(input_mixup(images, s.perm, s.lam), s.lam)
