"""Hooks for the baseline and the unaligned mixing methods (input mixup, CutMix, manifold mixup)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.hooks.base import Hook, HookOutput, uniform_choice
from pipeline.mixing import cutmix, input_mixup, mix, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class BaselineHook(Hook):
    """No mixing: cross-entropy on the clean batch."""

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        logits = model(images)
        return HookOutput(self.clean_loss(logits, labels), logits)


class InputMixupHook(Hook):
    """Input mixup: λx + (1−λ)x[π], labels mixed the same way."""

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        s = sample_mix(images.shape[0], self.method.alpha, images.device, generator=rng)
        with self.timer.section("mix", images.device):
            mixed = input_mixup(images, s.perm, s.lam)
        logits = model(mixed)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        return HookOutput(loss, logits, {"lam": torch.tensor(s.lam)})


class CutMixHook(Hook):
    """CutMix with timm's box logic; λ is corrected to the pasted area."""

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        s = sample_mix(images.shape[0], self.method.cutmix_alpha, images.device, generator=rng)
        with self.timer.section("mix", images.device):
            mixed, lam = cutmix(images, s.perm, s.lam)
        logits = model(mixed)
        loss = mixed_cross_entropy(logits, labels, s.perm, lam, self.label_smoothing)
        return HookOutput(loss, logits, {"lam": torch.tensor(lam)})


class ManifoldMixupHook(Hook):
    """Manifold mixup: mix the hidden state at a level drawn from `method.manifold_levels`."""

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        levels = [k for k in self.method.manifold_levels if k < model.num_levels] or [0]
        level = uniform_choice(levels, rng)
        s = sample_mix(images.shape[0], self.method.alpha, images.device, generator=rng)
        hidden = model.forward_levels(images, 0, level)
        with self.timer.section("mix", images.device):
            hidden = mix(hidden, hidden[s.perm], s.lam)
        logits = model.head(model.forward_levels(hidden, level, model.num_levels))
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        return HookOutput(loss, logits, {"lam": torch.tensor(s.lam), "level": torch.tensor(level)})
