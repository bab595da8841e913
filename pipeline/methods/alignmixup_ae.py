"""AlignMixup/AE: an embedding e = f(A) and a decoder trained on clean batches; mixing at x, A
(aligned) or e (docs/models.md; paper Table 2: 18.83 % top-1 error)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.alignmixup import Aligner, AlignSettings
from pipeline.methods.base import Method, MethodOutput, coin, uniform_choice
from pipeline.methods.registry import register_method
from pipeline.mixing import input_mixup, mix, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class AlignMixupAESettings(AlignSettings):
    clean_prob: float = Field(0.2, ge=0, le=1, description="share of clean (decoder) batches")
    recon_weight: float = Field(1.0, ge=0, description="weight of L_r on clean batches")
    mix_levels: list[Literal["x", "A", "e"]] = Field(
        default_factory=lambda: ["x", "A", "e"], min_length=1, description="where mixed batches mix"
    )


@register_method("alignmixup_ae")
class AlignMixupAE(Aligner, Method):
    """Clean batches (share `clean_prob`) train classifier and decoder with CE + w·L_r; the
    others mix at a level drawn from `mix_levels` (x, A aligned, or e) and train the classifier
    only. The decoder never sees a mixed batch; the classifier never sees a decoded image.
    """

    Settings = AlignMixupAESettings
    needs_decoder = True
    unused_parameters = ("decoder.",)  # no decoder on mixed batches
    table_order = 70

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        cfg = self.settings
        choices = self.choice_generator(rng)
        if coin(cfg.clean_prob, choices):
            e = model.embed(model.features(images))
            logits = model.classify(e)
            with self.timer.section("decode", images.device):
                recon = torch.nn.functional.mse_loss(model.decode(e).float(), images.float())
            loss = self.clean_loss(logits, labels) + cfg.recon_weight * recon
            stats = {"recon": recon.detach(), "clean": torch.tensor(1.0)}
            return MethodOutput(loss, logits, stats)

        level = uniform_choice(cfg.mix_levels, choices)
        s = sample_mix(images.shape[0], cfg.alpha, images.device, rng, choices)
        if level == "x":
            with self.timer.section("mix", images.device):
                images = input_mixup(images, s.perm, s.lam)
        a = model.features(images)
        if level == "A":
            a = self.aligned(a, s, choices)
        e = model.embed(a)
        if level == "e":
            with self.timer.section("mix", images.device):
                e = mix(e, e[s.perm], s.lam)
        logits = model.classify(e)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(s.lam), "clean": torch.tensor(0.0)})
