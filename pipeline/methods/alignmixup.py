"""AlignMixup (Venkataramanan et al., CVPR 2022): per batch, mixing at a level drawn from
`mix_levels`: the input x, the last feature tensor A (aligned, eqs. 11–12, or not, eq. 2), or
the output of an extra layer f (docs/mixing.md; paper Table 2: 20.68 % top-1 error; the
ablation switches are the paper's Table 6)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from pipeline.errors import RecipeError
from pipeline.methods.base import (
    Method,
    MethodOutput,
    MixSettings,
    ModelNeeds,
    rank_seed,
    uniform_choice,
)
from pipeline.methods.registry import register_method
from pipeline.mixing import (
    MixSample,
    SinkhornOptions,
    align,
    align_mix,
    input_mixup,
    mix,
    mix_aligned,
    mixed_cross_entropy,
    sample_mix,
)
from pipeline.models import MixNet

Level = Literal["x", "A", "e", "E"]


class AlignSettings(MixSettings):
    """Settings of every method that aligns feature tensors: the Sinkhorn solver's, and the
    ablation switches of the paper's Table 6 that act on A."""

    sinkhorn: Literal["authors", "converged"] = Field(
        "authors", description="the authors' solver, or one run to convergence (docs/mixing.md)"
    )
    sinkhorn_eps: float = Field(0.1, gt=0, description="entropic regularisation ε")
    sinkhorn_max_iter: int | None = Field(
        None, ge=1, description="None: 100 for authors, 1000 for converged"
    )
    sinkhorn_tol: float = Field(
        1e-3, gt=0, lt=1, description="converged: stop once both marginals are within this"
    )
    sinkhorn_host_checks: bool | None = Field(
        None,
        description="read the stopping rule on the host; false: no host sync, all max_iter "
        "iterations queued (same plan); None: false for authors on CUDA, else true",
    )
    sinkhorn_backend: Literal["auto", "eager", "triton"] = Field(
        "auto",
        description="auto: the fused Triton solver on CUDA for maps up to 64 positions, else "
        "the eager loop; eager or triton to force one (tests, benchmarks)",
    )
    align: bool = Field(
        True,
        description="mix A (and E) aligned (eqs. 11-12); false: unaligned, λA + (1-λ)A' "
        "(eq. 2), the 'unaligned' column of the paper's Table 6",
    )
    align_pool: int | None = Field(
        None,
        ge=1,
        description="average-pool A to this side before mixing it (the paper's A_2×2); "
        "None: A's own grid",
    )

    def solver(self) -> SinkhornOptions:
        """The Sinkhorn options these settings give, for `align_mix`, `align` and `sinkhorn`."""
        return SinkhornOptions(
            mode=self.sinkhorn,
            eps=self.sinkhorn_eps,
            max_iter=self.sinkhorn_max_iter,
            tol=self.sinkhorn_tol,
            host_checks=self.sinkhorn_host_checks,
            backend=self.sinkhorn_backend,
        )


def check_levels(levels: list[str]) -> list[str]:
    """`mix_levels` validator: no repeats, and not both e and E (both are f's output)."""
    if len(set(levels)) != len(levels):
        raise ValueError(f"repeated levels in {levels}")
    if {"e", "E"} <= set(levels):
        raise ValueError("e and E are both the output of f (mixed plainly or as A): pick one")
    return levels


class AlignMixupSettings(AlignSettings):
    mix_levels: list[Level] = Field(
        default_factory=lambda: ["x", "A"],
        min_length=1,
        description="where a batch mixes, one drawn per batch: x (input), A (last features), "
        "e (f's output, plain mixing) or E (f's output, aligned as A); e/E add f (model.ae)",
    )

    _levels = field_validator("mix_levels")(check_levels)


class Aligner(Method):
    """Mixing at a level of the network, shared by AlignMixup and AlignMixup/AE (and /VAE)."""

    settings: AlignSettings

    def mix_tensor(
        self, t: Tensor, s: MixSample, choices: torch.Generator, pool: int | None = None
    ) -> Tensor:
        """`t` mixed with `t[π]`: aligned in a direction drawn per batch (eq. 11 or 12) or,
        with `align: false`, plainly (eq. 2); first average-pooled to `pool` × `pool`."""
        if pool is not None:
            t = torch.nn.functional.adaptive_avg_pool2d(t, pool)
        if not self.settings.align:
            with self.section("mix"):
                return mix(t, t[s.perm], s.lam)
        direction = uniform_choice((0, 1), choices)
        with self.section("align"):
            return align_mix(t, t[s.perm], s.lam, direction, self.settings.solver())

    def mix_moments(
        self, mu: Tensor, sigma: Tensor, s: MixSample, level: str, choices: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The VAE's `(μ, σ)` mixed together: plainly (level e, or E unaligned), or both with
        the one plan solved on μ (level E aligned)."""
        if level == "e" or not self.settings.align:
            return mix(mu, mu[s.perm], s.lam), mix(sigma, sigma[s.perm], s.lam)
        direction = uniform_choice((0, 1), choices)
        with self.section("align"):
            plan = align(mu, mu[s.perm], self.settings.solver())
            return tuple(mix_aligned(t, t[s.perm], plan, s.lam, direction) for t in (mu, sigma))

    def gaussian(self, like: Tensor, choices: torch.Generator) -> Tensor:
        """ε ~ N(0, 1) of `like`'s shape, on its device, from a generator seeded by one draw
        of `choices` and this rank (ranks differ; a resumed step draws the same again)."""
        step_seed = int(torch.randint(2**62, (1,), generator=choices))
        gen = torch.Generator(like.device).manual_seed(rank_seed(step_seed, self.context.rank))
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def reparameterise(self, mu: Tensor, sigma: Tensor, choices: torch.Generator) -> Tensor:
        """The VAE's sample `e = μ + σ·ε`."""
        return mu + sigma * self.gaussian(mu, choices)

    def mixed_logits(
        self, model: MixNet, images: Tensor, s: MixSample, level: str, choices: torch.Generator
    ) -> Tensor:
        """Class scores of the batch mixed at `level` (x, A, e or E); models without `f`
        classify A, the VAE samples e from (possibly mixed) μ and σ."""
        if level == "x":
            with self.section("mix"):
                images = input_mixup(images, s.perm, s.lam)
        a = model.features(images)
        if level == "A":
            a = self.mix_tensor(a, s, choices, self.settings.align_pool)
        if not model.has_embedding:
            return model.head(a)
        if model.variational:
            mu, log_var = model.moments(a)
            sigma = torch.exp(0.5 * log_var)
            if level in ("e", "E"):
                mu, sigma = self.mix_moments(mu, sigma, s, level, choices)
            return model.classify(self.reparameterise(mu, sigma, choices))
        e = model.embed(a)
        if level == "e":
            with self.section("mix"):
                e = mix(e, e[s.perm], s.lam)
        elif level == "E":
            e = self.mix_tensor(e, s, choices)
        return model.classify(e)


def check_embedding_levels(levels: list[str], model: MixNet) -> None:
    """Raise RecipeError where a level does not fit the model's f (`model.ae`)."""
    if "E" in levels and model.embedding_kind == "vector":
        raise RecipeError(
            "method.mix_levels: E mixes f's output as a tensor, but model.ae.embedding is "
            "'vector' (the paper's e, mixed plainly: level e); use embedding 'tensor' or 'grid'"
        )


@register_method("alignmixup")
class AlignMixup(Aligner):
    """The authors' schedule by default: each batch is input mixup or aligned mixing of `A`, ½
    each; `mix_levels`, `align` and `align_pool` give the rows of the paper's Table 6."""

    Settings = AlignMixupSettings

    @classmethod
    def needs(cls, settings: AlignMixupSettings) -> ModelNeeds:
        """f when a level mixes its output (e or E)."""
        return ModelNeeds(embedding=bool({"e", "E"} & set(settings.mix_levels)))

    def check_model(self, model: MixNet) -> None:
        if model.variational:
            raise RecipeError(
                "model.ae.variational: the VAE trains its decoder on clean batches, which is "
                "AlignMixup/AE's schedule (method.name: alignmixup_ae)"
            )
        check_embedding_levels(self.settings.mix_levels, model)

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        level = uniform_choice(self.settings.mix_levels, choices)
        logits = self.mixed_logits(model, images, s, level, choices)
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.context.label_smoothing)
        aligned = self.settings.align and level in ("A", "E")
        stats = {"lam": torch.tensor(s.lam), "aligned": torch.tensor(float(aligned))}
        return MethodOutput(loss, logits, stats)
