"""AlignMixup/AE: an embedding e = f(A) and a decoder trained on clean batches; mixing at x, A
(aligned), e or E (docs/models.md; paper Table 2: 18.83 % top-1 error). With
`model.ae.variational` it is AlignMixup/VAE: f gives μ and log σ², e = μ + σ·ε, and clean
batches add the KL term (the paper's Table 6)."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from pipeline.methods.alignmixup import (
    Aligner,
    AlignSettings,
    Level,
    check_embedding_levels,
    check_levels,
)
from pipeline.methods.base import MethodOutput, ModelNeeds, coin, uniform_choice
from pipeline.methods.registry import register_method
from pipeline.mixing import mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class AlignMixupAESettings(AlignSettings):
    clean_prob: float = Field(0.2, ge=0, le=1, description="share of clean (decoder) batches")
    recon_weight: float = Field(1.0, ge=0, description="weight of L_r on clean batches")
    kl_weight: float = Field(
        1.0, ge=0, description="model.ae.variational: weight of the KL term on clean batches"
    )
    mix_levels: list[Level] = Field(
        default_factory=lambda: ["x", "A", "e"],
        min_length=1,
        description="where mixed batches mix: x, A (aligned unless align: false), e (f's "
        "output, plainly; the VAE's μ and σ) or E (f's output, aligned as A)",
    )

    _levels = field_validator("mix_levels")(check_levels)


def gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per latent dimension, averaged over dimensions and batch:
    ½·mean(μ² + σ² − 1 − log σ²), so that its weight compares with the per-pixel L_r."""
    return 0.5 * (mu.square() + log_var.exp() - 1.0 - log_var).mean()


@register_method("alignmixup_ae")
class AlignMixupAE(Aligner):
    """Clean batches (share `clean_prob`) train classifier and decoder with CE + w·L_r (+ the
    VAE's KL); the others mix at a level drawn from `mix_levels` and train the classifier
    only. The decoder never sees a mixed batch; the classifier never sees a decoded image.
    """

    Settings = AlignMixupAESettings

    @classmethod
    def needs(cls, settings: AlignMixupAESettings) -> ModelNeeds:
        """f and the decoder; the decoder gets no gradient on mixed batches."""
        return ModelNeeds(embedding=True, decoder=True, unused_parameters=("decoder.",))

    def check_model(self, model: MixNet) -> None:
        check_embedding_levels(self.settings.mix_levels, model)

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        cfg = self.settings
        choices = self.choice_generator(rng)
        if coin(cfg.clean_prob, choices):
            return self.clean_step(model, images, labels, choices)
        level = uniform_choice(cfg.mix_levels, choices)
        s = sample_mix(images.shape[0], cfg.alpha, images.device, rng, choices)
        logits = self.mixed_logits(model, images, s, level, choices)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.context.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(s.lam), "clean": torch.tensor(0.0)})

    def clean_step(
        self, model: MixNet, images: Tensor, labels: Tensor, choices: torch.Generator
    ) -> MethodOutput:
        """CE on the clean batch, plus w·L_r of its reconstruction (and the VAE's KL term)."""
        a = model.features(images)
        stats = {"clean": torch.tensor(1.0)}
        if model.variational:
            mu, log_var = model.moments(a)
            e = self.reparameterise(mu, torch.exp(0.5 * log_var), choices)
            kl = gaussian_kl(mu.float(), log_var.float())
            stats["kl"] = kl.detach()
        else:
            e, kl = model.embed(a), None
        logits = model.classify(e)
        with self.section("decode"):
            recon = torch.nn.functional.mse_loss(model.decode(e).float(), images.float())
        loss = self.clean_loss(logits, labels) + self.settings.recon_weight * recon
        if kl is not None:
            loss = loss + self.settings.kl_weight * kl
        stats["recon"] = recon.detach()
        return MethodOutput(loss, logits, stats)
