"""AlignMixup (Venkataramanan et al., CVPR 2022): per batch, input mixup or aligned mixing of the
last feature tensor A (docs/mixing.md; paper Table 2: 20.68 % top-1 error)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings, coin, uniform_choice
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample, align_mix, input_mixup, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class AlignSettings(MixSettings):
    """Settings of every method that aligns feature tensors: the Sinkhorn solver's."""

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

    def solver(self) -> dict[str, Any]:
        """Keyword arguments of `align_mix`, `align_features` and `sinkhorn`."""
        return {
            "mode": self.sinkhorn,
            "eps": self.sinkhorn_eps,
            "max_iter": self.sinkhorn_max_iter,
            "tol": self.sinkhorn_tol,
            "host_checks": self.sinkhorn_host_checks,
        }


class Aligner:
    """Aligned mixing of `A` with its partner, in a direction (eq. 11 or 12) drawn per batch."""

    settings: AlignSettings
    timer: Any

    def aligned(self, a: Tensor, s: MixSample, choices: torch.Generator) -> Tensor:
        direction = uniform_choice((0, 1), choices)
        with self.timer.section("align", a.device):
            return align_mix(a, a[s.perm], s.lam, direction, **self.settings.solver())


@register_method("alignmixup")
class AlignMixup(Aligner, Method):
    """The authors' schedule: each batch is input mixup or aligned mixing of `A`, ½ each."""

    Settings = AlignSettings
    table_order = 60

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        at_input = coin(0.5, choices)
        if at_input:
            with self.timer.section("mix", images.device):
                images = input_mixup(images, s.perm, s.lam)
            logits = model(images)
        else:
            logits = model.head(self.aligned(model.features(images), s, choices))
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.label_smoothing)
        stats = {"lam": torch.tensor(s.lam), "aligned": torch.tensor(float(not at_input))}
        return MethodOutput(loss, logits, stats)
