"""FGSM and PGD (L∞) on [0, 1] pixels with the normalisation inside the model (docs/evaluation.md).

Written by hand: each attack is a few lines, and no attack library is pinned in this project
(torchattacks is not installed). The protocol is PuzzleMix's, as the paper uses it:
FGSM ε = 8/255 in one step; PGD ε = 4/255, step 2/255, 20 iterations, random start.
The caller puts the model in eval mode; only the gradient with respect to the input is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Normalize", "fgsm", "pgd", "pixel_model"]


class Normalize(nn.Module):
    """(x − mean) / std per channel, so a model can take [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def pixel_model(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """The model as a function of [0, 1] pixels: normalisation first, then the network."""
    return nn.Sequential(Normalize(mean, std), model).to(next(model.parameters()).device)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ CE / ∂ x (labels −1, the loader's padding, contribute nothing)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, ignore_index=-1, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the L∞ ε-ball around x and into [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255) -> torch.Tensor:
    """One signed-gradient step of size ε from x (pixels in [0, 1])."""
    x = x.detach()
    return _project(x + eps * _input_grad(model, x, y).sign(), x, eps).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 4 / 255,
    step: float = 2 / 255,
    iterations: int = 20,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy, from a uniform point in the ε-ball."""
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = _project(x + (2.0 * noise - 1.0) * eps, x, eps)
    for _ in range(iterations):
        x_adv = _project(x_adv + step * _input_grad(model, x_adv, y).sign(), x, eps)
    return x_adv.detach()
