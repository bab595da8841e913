"""Decoded interpolations between two images' feature tensors, unaligned and aligned (Figure 3).

Rows, each decoded through `model.embed` and `model.decode`:
- unaligned:      λA + (1−λ)A'
- aligned eq. 11: λA + (1−λ)Ã,  Ã = A'Rᵀ (A' brought into A's geometry)
- aligned eq. 12: λÃ' + (1−λ)A', Ã' = AR (A brought into A''s geometry)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LAMBDAS = (1.0, 0.75, 0.5, 0.25, 0.0)  # left to right: from A towards A'
ROWS = (
    ("unaligned", "λA + (1−λ)A′"),
    ("aligned, eq. 11", "λA + (1−λ)A′Rᵀ"),
    ("aligned, eq. 12", "λAR + (1−λ)A′"),
)


@torch.no_grad()
def decoded_interpolations(
    model: torch.nn.Module,
    image_a: Tensor,
    image_b: Tensor,
    solver: dict[str, Any],
    lambdas: tuple[float, ...] = LAMBDAS,
) -> Tensor:
    """(len(ROWS), len(lambdas), 3, H, W) decoded images, in the model's normalised pixel space.

    `image_a`, `image_b` are (3, H, W) normalised images; the model must be an AE model in eval
    mode. `solver` holds the recipe's Sinkhorn mode, ε and iteration cap (`AlignSettings.solver()`).
    """
    from pipeline.mixing import align_features, mix

    feats = model.features(torch.stack([image_a, image_b]))
    a, a_partner = feats[:1], feats[1:]
    a_partner_aligned = align_features(a, a_partner, direction=0, **solver)  # Ã = A'Rᵀ
    a_aligned = align_features(a, a_partner, direction=1, **solver)  # Ã' = AR
    pairs = ((a, a_partner), (a, a_partner_aligned), (a_aligned, a_partner))
    mixed = torch.cat([mix(first, second, lam) for first, second in pairs for lam in lambdas])
    decoded = model.decode(model.embed(mixed))
    return decoded.view(len(pairs), len(lambdas), *decoded.shape[1:])


def alignment_effect(decoded: Tensor) -> Tensor:
    """(2, len(lambdas)): mean |aligned − unaligned| over pixels and channels, for eq. 11 (row 0)
    and eq. 12 (row 1) at each λ; `decoded` as from `decoded_interpolations`. Zero where the
    equations reduce to unaligned mixing (eq. 11 at λ = 1, eq. 12 at λ = 0) or R is the
    identity; how far above zero the rest are is how much alignment changes the picture."""
    return (decoded[1:] - decoded[:1]).abs().flatten(2).mean(-1)


def effect_table(effect: Tensor, lambdas: tuple[float, ...] = LAMBDAS) -> str:
    """The mean |aligned − unaligned| per λ as a Markdown table, one row per equation."""
    from pipeline.runs.table import format_table

    headers = ["mean abs(aligned − unaligned)", *(f"λ = {lam:g}" for lam in lambdas)]
    rows = [
        [label, *(f"{v:.3f}" for v in values.tolist())]
        for (label, _), values in zip(ROWS[1:], effect, strict=True)
    ]
    return format_table(headers, rows)
