"""CutMix (Yun et al., 2019): a box of x[π] pasted into x, labels weighted by its area."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings
from pipeline.methods.registry import register_method
from pipeline.mixing import cutmix, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class CutMixSettings(MixSettings):
    alpha: float = Field(1.0, gt=0, description="λ ~ Beta(α, α); the CutMix paper's 1")


@register_method("cutmix")
class CutMix(Method):
    """The CutMix authors' box, its centre drawn from the step's generator; λ is corrected to
    the share of each image left unpasted (the box is clipped at the border)."""

    Settings = CutMixSettings

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        with self.section("mix"):
            mixed, lam = cutmix(images, s.perm, s.lam, generator=choices)
        logits = model(mixed)
        loss = mixed_cross_entropy(logits, labels, s.perm, lam, self.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(lam)})
