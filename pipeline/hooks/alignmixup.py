"""AlignMixup hooks: aligned mixing of the last feature tensor (SPEC.md §3–4)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.hooks.base import Hook, HookOutput, coin, uniform_choice
from pipeline.hooks.standard import CutMixHook
from pipeline.mixing import align_mix, input_mixup, mix, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class AlignMixupHook(Hook):
    """The authors' schedule: each batch is input mixup or aligned mixing of `A`, 1/2 each."""

    def aligned(self, a: Tensor, s, rng: torch.Generator) -> Tensor:
        """`A` mixed with its aligned partner, in a direction (eq. 11 or 12) drawn per batch."""
        direction = uniform_choice((0, 1), rng)
        with self.timer.section("align", a.device):
            return align_mix(
                a,
                a[s.perm],
                s.lam,
                direction,
                mode=self.method.sinkhorn,
                eps=self.method.sinkhorn_eps,
                max_iter=self.method.sinkhorn_max_iter,
            )

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        s = sample_mix(images.shape[0], self.method.alpha, images.device, generator=rng)
        at_input = coin(0.5, rng)
        if at_input:
            with self.timer.section("mix", images.device):
                images = input_mixup(images, s.perm, s.lam)
            logits = model(images)
        else:
            logits = model.head(self.aligned(model.features(images), s, rng))
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        stats = {"lam": torch.tensor(s.lam), "aligned": torch.tensor(float(not at_input))}
        return HookOutput(loss, logits, stats)


class AlignMixupAEHook(AlignMixupHook):
    """AlignMixup/AE: clean batches (share `ae_clean_prob`) train classifier and decoder with
    CE + w·L_r; the others mix at a level drawn from `ae_mix_levels` (x, A aligned, or e) and
    train the classifier only. The decoder never sees a mixed batch; the classifier never sees a
    decoded image.
    """

    needs_decoder = True

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        if coin(self.method.ae_clean_prob, rng):
            e = model.embed(model.features(images))
            logits = model.classify(e)
            with self.timer.section("decode", images.device):
                recon = torch.nn.functional.mse_loss(model.decode(e).float(), images.float())
            loss = self.clean_loss(logits, labels) + self.method.ae_recon_weight * recon
            return HookOutput(loss, logits, {"recon": recon.detach(), "clean": torch.tensor(1.0)})

        level = uniform_choice(self.method.ae_mix_levels, rng)
        s = sample_mix(images.shape[0], self.method.alpha, images.device, generator=rng)
        if level == "x":
            with self.timer.section("mix", images.device):
                images = input_mixup(images, s.perm, s.lam)
        a = model.features(images)
        if level == "A":
            a = self.aligned(a, s, rng)
        e = model.embed(a)
        if level == "e":
            with self.timer.section("mix", images.device):
                e = mix(e, e[s.perm], s.lam)
        logits = model.classify(e)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        return HookOutput(loss, logits, {"lam": torch.tensor(s.lam), "clean": torch.tensor(0.0)})


class AlignMixupOrCutMixHook(Hook):
    """Seed 002's variant: each batch is CutMix with probability `cutmix_prob`, else AlignMixup."""

    def __init__(self, method, label_smoothing: float = 0.0) -> None:
        super().__init__(method, label_smoothing)
        self.cutmix = CutMixHook(method, label_smoothing)
        self.alignmixup = AlignMixupHook(method, label_smoothing)
        self.cutmix.timer = self.alignmixup.timer = self.timer

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        chosen = self.cutmix if coin(self.method.cutmix_prob, rng) else self.alignmixup
        return chosen(model, images, labels, rng)
