"""Input mixup (Zhang et al., 2018): λx + (1−λ)x[π], labels mixed the same way."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings
from pipeline.methods.registry import register_method
from pipeline.mixing import input_mixup, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


@register_method("input_mixup")
class InputMixup(Method):
    """Mix the images: λx + (1−λ)x[π], λ ~ Beta(α, α) and π drawn once per batch."""

    Settings = MixSettings

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        with self.section("mix"):
            mixed = input_mixup(images, s.perm, s.lam)
        logits = model(mixed)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(s.lam)})
