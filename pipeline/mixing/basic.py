"""Plain mixing: λ and partner sampling, input mixup, CutMix and the mixed loss (docs/mixing.md)."""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MixSample",
    "check_lam",
    "cutmix",
    "cutmix_box",
    "input_mixup",
    "mix",
    "mixed_cross_entropy",
    "per_sample_mixed_cross_entropy",
    "sample_mix",
]


class MixSample(NamedTuple):
    """One batch's mixing draw: λ and the partner permutation π (x' = x[π])."""

    lam: float
    perm: Tensor  # (B,) int64, a permutation of range(B)


def check_lam(lam: float) -> float:
    """Return lam as a float, or raise ValueError unless it is a number in [0, 1]."""
    if not isinstance(lam, Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    return float(lam)


def _check_perm(perm: Tensor, batch_size: int) -> None:
    """Raise ValueError unless perm is a 1-D integer tensor of length batch_size."""
    if (
        perm.dim() != 1
        or perm.shape[0] != batch_size
        or perm.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(
            f"perm must be a 1-D int64 tensor of length {batch_size} (the batch size), got "
            f"shape {tuple(perm.shape)} dtype {perm.dtype}"
        )


def sample_mix(
    batch_size: int,
    alpha: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    perm_generator: torch.Generator | None = None,
) -> MixSample:
    """Draw λ ~ Beta(α, α) and a random permutation for one batch, on torch's CPU RNG.

    λ comes from `generator`, the permutation from `perm_generator` (default: `generator`).
    Without `generator` the draw uses torch's global CPU RNG, whose state Accelerate saves
    in checkpoints, so a resumed run draws the same sequence. The permutation is moved to
    `device` (drawing on the CPU keeps λ a Python float without a device sync).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(alpha, Real) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    # torch.distributions.Beta takes no generator, so λ comes from NumPy's Beta sampler seeded
    # by one draw from the torch generator: still governed by `generator` (or the global RNG).
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    if perm_generator is None:
        perm_generator = generator
    perm = torch.randperm(batch_size, generator=perm_generator)
    if torch.device(device).type == "cuda":
        # From pinned memory the copy is asynchronous; from pageable memory it would wait for
        # the GPU to finish queued work, i.e. synchronise every training step.
        perm = perm.pin_memory().to(device, non_blocking=True)
    else:
        perm = perm.to(device)
    return MixSample(lam=lam, perm=perm)


def mix(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """λa + (1−λ)b for tensors of one shape."""
    lam = check_lam(lam)
    if a.shape != b.shape:
        raise ValueError(
            f"mix expects tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a * lam + b * (1.0 - lam)


def input_mixup(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    """Input mixup: λx + (1−λ)x[π]."""
    _check_perm(perm, x.shape[0])
    return mix(x, x[perm], lam)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """The CutMix authors' box `(y0, y1, x0, x1)` for an image of `height` × `width`.

    As their `rand_bbox` (clovaai/CutMix-PyTorch): cut sides `int(H·√(1−λ))`, `int(W·√(1−λ))`,
    a centre drawn uniformly over the pixels (here from `generator`), `cut // 2` on each side of
    it (so an odd cut loses a pixel), clipped to the image.
    """
    ratio = math.sqrt(1.0 - check_lam(lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix(
    x: Tensor, perm: Tensor, lam: float, generator: torch.Generator | None = None
) -> tuple[Tensor, float]:
    """CutMix on (B, C, H, W): the box of `cutmix_box` pasted from x[π]; → (mixed, λ of the box).

    The returned λ is 1 − box area / HW, the share of each image that is still its own.
    """
    lam = check_lam(lam)
    if x.dim() != 4:
        raise ValueError(f"cutmix expects a 4-D (B, C, H, W) batch, got shape {tuple(x.shape)}")
    _check_perm(perm, x.shape[0])
    height, width = x.shape[-2:]
    y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return mixed, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mixed_cross_entropy(
    logits: Tensor, y: Tensor, perm: Tensor, lam: float, label_smoothing: float = 0.0
) -> Tensor:
    """λ·CE(logits, y) + (1−λ)·CE(logits, y[π]), each a batch mean."""
    lam = check_lam(lam)
    _check_perm(perm, y.shape[0])
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(
            f"mixed_cross_entropy expects logits (B, classes) and labels (B,), got "
            f"{tuple(logits.shape)} and {tuple(y.shape)}"
        )
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    loss_partner = F.cross_entropy(logits, y[perm], label_smoothing=label_smoothing)
    return loss * lam + loss_partner * (1.0 - lam)


def per_sample_mixed_cross_entropy(
    logits: Tensor, y: Tensor, perm: Tensor, lam: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """mean_b [λ_b·CE(logits_b, y_b) + (1 − λ_b)·CE(logits_b, y_π(b))] for a (B,) λ."""
    _check_perm(perm, y.shape[0])
    if logits.dim() != 2 or logits.shape[0] != y.shape[0] or lam.shape != y.shape:
        raise ValueError(
            f"expects logits (B, classes), labels (B,) and lam (B,), got {tuple(logits.shape)}, "
            f"{tuple(y.shape)} and {tuple(lam.shape)}"
        )
    ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    ce_partner = F.cross_entropy(logits, y[perm], reduction="none", label_smoothing=label_smoothing)
    lam = lam.to(ce.dtype)
    return (lam * ce + (1 - lam) * ce_partner).mean()
