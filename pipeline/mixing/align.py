"""Aligned mixing of feature tensors, AlignMixup eq. 11/12 (docs/mixing.md).

The plan is computed under no_grad on detached float32 features, so gradients reach `a` and
`a_partner` only through the alignment matmul and the mix. Under autocast that matmul runs
in the autocast dtype (bf16/fp16): the result then differs from the float32 one by about
that dtype's rounding (relative 2^-8 for bf16, 2^-11 for fp16) of the features' magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.mixing.basic import check_lam
from pipeline.mixing.sinkhorn import DEFAULT_SINKHORN, SinkhornOptions, sinkhorn, squared_cost

__all__ = ["align", "align_features", "align_mix", "mix_aligned"]


def _check_pair(a: Tensor, a_partner: Tensor) -> None:
    """Raise ValueError unless both are (B, c, h, w) tensors of one shape, dtype and device."""
    if a.dim() != 4 or a_partner.dim() != 4:
        raise ValueError(
            f"aligned mixing expects 4-D (B, c, h, w) feature tensors, got shapes "
            f"{tuple(a.shape)} and {tuple(a_partner.shape)}"
        )
    if a.shape != a_partner.shape:
        raise ValueError(
            f"aligned mixing expects a and a_partner of the same shape, got "
            f"{tuple(a.shape)} and {tuple(a_partner.shape)}"
        )
    if a.dtype != a_partner.dtype or a.device != a_partner.device:
        raise ValueError(
            f"aligned mixing expects a and a_partner of the same dtype and device, got "
            f"{a.dtype} on {a.device} and {a_partner.dtype} on {a_partner.device}"
        )


def _check_direction(direction: int) -> None:
    """Raise ValueError unless direction is 0 (eq. 11) or 1 (eq. 12)."""
    if isinstance(direction, bool) or direction not in (0, 1):
        raise ValueError(f"direction must be 0 (eq. 11) or 1 (eq. 12), got {direction!r}")


def align(a: Tensor, a_partner: Tensor, options: SinkhornOptions = DEFAULT_SINKHORN) -> Tensor:
    """Assignment matrix R = r·P* (B, r, r) float32; rows index A's positions, columns A''s.
    `options` go to `sinkhorn`."""
    _check_pair(a, a_partner)
    feats = a.detach().flatten(2).transpose(1, 2)  # (B, r, c): row i is a_i
    partner = a_partner.detach().flatten(2).transpose(1, 2)
    cost = squared_cost(feats, partner)
    plan = sinkhorn(cost, options).plan
    assignment = plan * plan.shape[1]
    # The authors' plans are full of subnormal entries (exp of −100 and below); they add
    # nothing to the mix but make CPU matmuls several times slower, so they become 0.
    return assignment.masked_fill_(assignment < torch.finfo(torch.float32).tiny, 0.0)


def _aligned(a: Tensor, a_partner: Tensor, assignment: Tensor, direction: int) -> Tensor:
    """Ã = A'Rᵀ (direction 0) or Ã' = AR (direction 1), back in (B, c, h, w), input dtype."""
    source = a_partner if direction == 0 else a
    weights = assignment.transpose(1, 2) if direction == 0 else assignment
    # ("meta" tensors, for counting ops, have no autocast)
    if source.device.type == "meta" or not torch.is_autocast_enabled(source.device.type):
        weights = weights.to(source.dtype)  # under autocast, the matmul picks the dtype
    return torch.matmul(source.flatten(2), weights).view_as(source).to(source.dtype)


def align_features(
    a: Tensor, a_partner: Tensor, direction: int, options: SinkhornOptions = DEFAULT_SINKHORN
) -> Tensor:
    """Ã = A'Rᵀ (direction 0, A' in A's geometry) or Ã' = AR (direction 1), (B, c, h, w).

    For pictures of the interpolation path: mix the result with A (direction 0) or A'
    (direction 1) at any λ without solving the transport problem again.
    """
    _check_direction(direction)
    assignment = align(a, a_partner, options)
    return _aligned(a, a_partner, assignment, direction)


def align_mix(
    a: Tensor,
    a_partner: Tensor,
    lam: float,
    direction: int,
    options: SinkhornOptions = DEFAULT_SINKHORN,
) -> Tensor:
    """AlignMixup: λA + (1−λ)A'Rᵀ (direction 0, eq. 11) or λAR + (1−λ)A' (direction 1, eq. 12).

    `a`, `a_partner` are (B, c, h, w) features (A' = A[perm] in training); the output has
    their shape and dtype. `options` go to `sinkhorn`.
    """
    _check_pair(a, a_partner)
    _check_direction(direction)
    assignment = align(a, a_partner, options)
    return mix_aligned(a, a_partner, assignment, lam, direction)


def mix_aligned(
    a: Tensor, a_partner: Tensor, assignment: Tensor, lam: float, direction: int
) -> Tensor:
    """`align_mix` with a given assignment `R` (from `align`), so one plan can mix several
    tensors on the same grid (the VAE's μ and σ)."""
    _check_pair(a, a_partner)
    _check_direction(direction)
    lam = check_lam(lam)
    aligned = _aligned(a, a_partner, assignment, direction)
    # Mixed in place into the fresh aligned tensor: one (B, c, h, w) buffer, not three.
    if direction == 0:
        return aligned.mul_(1.0 - lam).add_(a, alpha=lam)
    return aligned.mul_(lam).add_(a_partner, alpha=1.0 - lam)
