"""PuzzleMix (Kim, Choo and Song, ICML 2020): the clean loss's input gradient as saliency, a
graph-cut block mask, salient blocks transported to where the mask keeps them (docs/mixing.md).

Defaults are the authors' ImageNet recipe (snu-mllab/PuzzleMix, `imagenet/train.py` and its
README command): λ ~ Beta(1, 1), grids of 2, 4, 8 or 16 blocks a side, 3 labels, β = 1.2,
γ = 0.5, η = 0.2, seams on 2-pixel cells, transport with ε = 0.8 at the graph-cut blocks, no
clean-loss term (so the saliency pass runs in eval mode).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import Method, MethodContext, MethodOutput, MixSettings, uniform_choice
from pipeline.methods.registry import register_method
from pipeline.mixing import per_sample_mixed_cross_entropy, sample_mix
from pipeline.mixing.puzzlemix import (
    PuzzleOptions,
    mix_by_mask,
    puzzle_mask,
    puzzle_transport,
    saliency_norm,
)
from pipeline.models import MixNet


class PuzzleMixSettings(MixSettings):
    alpha: float = Field(
        1.0, gt=0, description="λ ~ Beta(α, α): the prior's λ; the authors' 1 (`--beta 1.0`)"
    )
    block_nums: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=lambda: [2, 4, 8, 16],
        min_length=1,
        description="n of the n × n block grid, one drawn per batch (the authors' "
        "2**randint(1, 5)); the image side must be divisible by each",
    )
    n_labels: int = Field(
        3, ge=2, description="mask values per block: {0, 1/(L−1), …, 1} (the authors' 3)"
    )
    beta: float = Field(1.2, ge=0, description="label smoothness β (weight β/(16 n))")
    gamma: float = Field(0.5, ge=0, description="data (seam) smoothness γ, relative to β")
    eta: float = Field(0.2, ge=0, description="weight η of the λ prior (η/n² per block)")
    neigh_size: int = Field(
        2, ge=1, description="pixels per cell the seams are compared on (ImageNet: 2, CIFAR: 4)"
    )
    transport: bool = Field(True, description="move salient blocks to where the mask keeps them")
    t_eps: float = Field(0.8, ge=0, description="transport: weight of the distance moved")
    t_size: int | None = Field(
        None, ge=1, description="transport block side in pixels; None: the graph-cut blocks"
    )
    transport_solver: Literal["authors", "exact"] = Field(
        "authors",
        description="the authors' greedy bidding (some blocks dropped), or the optimal "
        "assignment (SciPy on the CPU, slower); docs/mixing.md",
    )
    clean_lam: float = Field(
        0.0,
        ge=0,
        description="weight of the clean loss added to the mixed loss; > 0 also runs the "
        "saliency pass in train mode and keeps its graph (the authors' `clean_lam`)",
    )


@register_method("puzzlemix")
class PuzzleMix(Method):
    """Per batch: a saliency pass on the clean batch (eval mode unless `clean_lam` > 0, input
    gradient only, parameter gradients untouched), a grid drawn from `block_nums`, the PuzzleMix
    mask and transport, then the mixed loss with per-sample λ = mask mean."""

    Settings = PuzzleMixSettings

    def __init__(self, settings: PuzzleMixSettings, context: MethodContext | None = None) -> None:
        """As every method, with the mixing functions' options built once from `settings` and
        the data's std (seams are measured in pixel units, as the authors')."""
        super().__init__(settings, context)
        st = settings
        self.options = PuzzleOptions(
            n_labels=st.n_labels,
            beta=st.beta,
            gamma=st.gamma,
            eta=st.eta,
            neigh_size=st.neigh_size,
            pixel_std=self.context.std,
            t_eps=st.t_eps,
            t_size=st.t_size,
            solver=st.transport_solver,
        )

    def saliency(self, model: MixNet, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(‖∂L/∂x‖₂ over channels, (B, H, W); the clean loss, mean CE(model(x), y)).

        L is the batch *sum* of the per-sample cross-entropies: in eval mode each image's
        gradient is then that of its own loss, of order 1 rather than 1/B, which fp16 autocast
        does not underflow; `block_saliency` normalises each image, so the scale is immaterial
        (the authors differentiate the mean). `torch.autograd.grad` with respect to the images
        alone, so no parameter gradient is accumulated. With `clean_lam` = 0 the model runs in
        eval mode (the authors': BatchNorm neither uses batch statistics nor updates its running
        ones) and the loss comes back detached; with `clean_lam` > 0 it runs in the model's own
        mode and the loss keeps its graph for the clean term.
        """
        keep_graph = self.settings.clean_lam > 0
        was_training = model.training
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():  # the step may run under no_grad (evaluation, tests)
            if not keep_graph:
                model.eval()
            try:
                total = F.cross_entropy(
                    model(x), labels, reduction="sum", label_smoothing=self.context.label_smoothing
                )
                (grad,) = torch.autograd.grad(total, x, retain_graph=keep_graph)
            finally:
                model.train(was_training)
        clean = total / images.shape[0]
        return saliency_norm(grad).detach(), clean if keep_graph else clean.detach()

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        st = self.settings
        device = images.device
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], st.alpha, device, rng, choices)
        grid = uniform_choice(st.block_nums, choices)
        with self.section("saliency"):
            saliency, clean = self.saliency(model, images, labels)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            x = images.float()
            with self.section("graphcut"):
                mask = puzzle_mask(x, s.perm, saliency, s.lam, grid, self.options)
            if st.transport:
                with self.section("transport"):
                    x, partner = puzzle_transport(x, s.perm, saliency, mask, self.options)
            else:
                partner = x[s.perm]
            with self.section("mix"):
                mixed, lam = mix_by_mask(x, partner, mask)
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        mixed = mixed.to(images.dtype)
        logits = model(mixed)
        smoothing = self.context.label_smoothing
        loss = per_sample_mixed_cross_entropy(logits, labels, s.perm, lam, smoothing)
        if st.clean_lam > 0:
            loss = loss + st.clean_lam * clean
        stats = {
            "lam": lam.mean().detach(),
            "lam_prior": torch.tensor(s.lam),
            "grid": torch.tensor(float(grid)),
        }
        return MethodOutput(loss, logits, stats)
