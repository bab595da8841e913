"""Decoded interpolations between two images' feature tensors, unaligned and aligned (Figure 3).

Rows, each decoded through `model.embed` and `model.decode`:
- unaligned:      λA + (1−λ)A'
- aligned eq. 11: λA + (1−λ)Ã,  Ã = A'Rᵀ (A' brought into A's geometry)
- aligned eq. 12: λÃ' + (1−λ)A', Ã' = AR (A brought into A''s geometry)

The paper's decoder exists to draw this figure: it learns on clean images only and the
classifier never sees its output. A short run (the demo's 6 epochs) leaves it too little
training to reconstruct anything, so `fit_decoder` may continue its training alone, on the
frozen encoder's features of clean images, before the picture is drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.mixing import SinkhornOptions
    from pipeline.models import MixNet

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
    solver: SinkhornOptions,
    lambdas: tuple[float, ...] = LAMBDAS,
) -> Tensor:
    """(len(ROWS), len(lambdas), 3, H, W) decoded images, in the model's normalised pixel space.

    `image_a`, `image_b` are (3, H, W) normalised images; the model must be an AE model in eval
    mode. `solver` is the recipe's Sinkhorn options (`AlignSettings.solver()`).
    """
    from pipeline.mixing import align_features, mix

    feats = model.features(torch.stack([image_a, image_b]))
    a, a_partner = feats[:1], feats[1:]
    a_partner_aligned = align_features(a, a_partner, 0, solver)  # Ã = A'Rᵀ
    a_aligned = align_features(a, a_partner, 1, solver)  # Ã' = AR
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
    from pipeline.tables import format_table

    headers = ["mean abs(aligned − unaligned)", *(f"λ = {lam:g}" for lam in lambdas)]
    rows = [
        [label, *(f"{v:.3f}" for v in values.tolist())]
        for (label, _), values in zip(ROWS[1:], effect, strict=True)
    ]
    return format_table(headers, rows)


def fit_decoder(
    model: MixNet,
    images: Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[float, float]:
    """Train `model.decoder` alone for `steps` Adam steps to reconstruct the clean, normalised
    `images` (N, 3, H, W) from `e = f(A)` of the frozen encoder, with L_r (mean squared error)
    as in training; return the (first, last) batch loss. Everything but the decoder keeps its
    weights and BatchNorm statistics; the model is left in eval mode.

    `e` is computed once (eval mode, no gradient), so each step costs one decoder forward and
    backward; the learning rate warms up over the first tenth of the steps, then anneals (one
    cycle), and batches are drawn with replacement from a generator seeded with `seed`.
    """
    from tqdm.auto import tqdm

    if not model.has_decoder:
        raise ValueError("fit_decoder needs an AlignMixup/AE model (one with a decoder)")
    decoder = model.decoder
    if steps < 1:
        return math.nan, math.nan
    model.eval()
    with torch.no_grad():
        e = torch.cat([model.embed(model.features(chunk)) for chunk in images.split(256)])
    trainable = [p.requires_grad for p in decoder.parameters()]
    decoder.requires_grad_(True).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = torch.Generator().manual_seed(seed)
    losses = []
    with torch.enable_grad():
        for _ in tqdm(
            range(steps), desc="fit decoder", disable=None if progress else True, leave=False
        ):
            pick = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=rng)
            loss = torch.nn.functional.mse_loss(decoder(e[pick]), images[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
    for p, flag in zip(decoder.parameters(), trainable, strict=True):
        p.requires_grad_(flag)
    model.eval()
    return losses[0], losses[-1]


def psnr(image: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of `image` against `reference`, both in [0, 1] pixels:
    10·log10(1 / MSE)."""
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
