"""PuzzleMix (Kim, Choo and Song, ICML 2020): a saliency-aware block mask found by a graph cut,
salient blocks moved to where the mask keeps them, then the two images pasted by the mask.

Plain functions on tensors, no module state (docs/mixing.md, "PuzzleMix"). A batch `x` is mixed
with its partner `x' = x[π]` on an `n × n` grid of square blocks:

1. `block_saliency`: the per-pixel saliency (the norm over channels of ∂loss/∂x, computed by the
   method) averaged over each block and normalised so that each image's blocks sum to 1.
2. `puzzle_terms` + `graphcut_mask`: a mask `z` on the grid, `z_b ∈ {0, 1/(L−1), …, 1}` the share
   of `x` in block `b` (`L = n_labels`), minimising the energy of `puzzle_terms` (stated there;
   `puzzle_energy` evaluates it) with gco's α-β swap on the CPU.
3. `transport_cost` + `greedy_assignment` / `exact_assignment` + `move_blocks`: each image's
   blocks are permuted so that its salient blocks land where its mask shows it.
4. `mix_by_mask`: `z·x̃ + (1 − z)·x̃'` with the mask upsampled to pixels; per-sample λ is the mask
   mean, and `pipeline.mixing.per_sample_mixed_cross_entropy` weights the two labels by it.

`puzzle_mask` composes 1–2 and `puzzle_transport` 3, both with the options of one
`PuzzleOptions`; the method (`pipeline.methods.puzzlemix`) runs them, then `mix_by_mask`. Bad
input raises ValueError saying what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.mixing.basic import _check_perm, check_lam

__all__ = [
    "DEFAULT_PUZZLE",
    "GRAPHCUT_RESOLUTION",
    "PuzzleOptions",
    "PuzzleTerms",
    "block_saliency",
    "boundary_distances",
    "exact_assignment",
    "graphcut_mask",
    "greedy_assignment",
    "label_prior",
    "mix_by_mask",
    "move_blocks",
    "puzzle_energy",
    "puzzle_mask",
    "puzzle_terms",
    "puzzle_transport",
    "saliency_norm",
    "transport",
    "transport_cost",
]

# gco works on int32 costs: each sample's largest energy term is scaled to this many units before
# rounding, so a term is exact to 2⁻²¹ of the largest one and sums stay far from int32 overflow.
GRAPHCUT_RESOLUTION = 2**20
_PRIOR_EPS = 1e-8  # the authors' ε inside −log(p + ε)


@dataclass(frozen=True)
class PuzzleOptions:
    """PuzzleMix's options as one value, built once from the method's settings (defaults: the
    authors' ImageNet recipe): the mask energy's, then the transport's."""

    n_labels: int = 3  # mask values per block: {0, 1/(L−1), …, 1}
    beta: float = 1.2  # label smoothness β
    gamma: float = 0.5  # data (seam) smoothness γ, relative to β
    eta: float = 0.2  # weight η of the λ prior
    neigh_size: int = 2  # pixels per cell the seams are compared on
    # per-channel std of the data normalisation: seams are measured on `images · std` (pixel
    # units, as the authors'); None: on the images as given
    pixel_std: tuple[float, ...] | None = None
    t_eps: float = 0.8  # transport: weight of the distance a block moves
    t_size: int | None = None  # transport block side in pixels; None: the graph-cut blocks
    solver: Literal["authors", "exact"] = "authors"  # transport: greedy bidding or optimal


DEFAULT_PUZZLE = PuzzleOptions()


# --- checks ---------------------------------------------------------------------------------


def _check_images(x: Tensor, name: str = "images") -> None:
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{name} must be a square 4-D (B, C, H, W) batch with H == W, got {tuple(x.shape)}"
        )


def _block_size(side: int, grid: int, what: str = "grid") -> int:
    """Pixels per block when a side of `side` pixels is cut into `grid` blocks."""
    if not isinstance(grid, int) or grid < 1 or side % grid:
        raise ValueError(
            f"{what} must be a positive integer that divides the image side {side}, got {grid!r}"
        )
    return side // grid


def _check_grid(t: Tensor, batch: int, grid: int, name: str) -> None:
    if t.shape != (batch, grid, grid):
        raise ValueError(
            f"{name} must have shape (B, n, n) = {(batch, grid, grid)}, got {tuple(t.shape)}"
        )


def _check_nonneg(value, name: str) -> float:
    if not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


# --- 1. saliency ----------------------------------------------------------------------------


def saliency_norm(grad: Tensor) -> Tensor:
    """(B, C, H, W) input gradient → (B, H, W) float32: its L2 norm over channels.

    The authors take the root *mean* square over channels; that is this norm divided by √C, a
    constant that the normalisation of `block_saliency` removes.
    """
    if grad.dim() != 4:
        raise ValueError(f"grad must be a 4-D (B, C, H, W) tensor, got shape {tuple(grad.shape)}")
    return torch.linalg.vector_norm(grad.float(), dim=1)


def block_saliency(saliency: Tensor, grid: int) -> Tensor:
    """(B, H, W) saliency → (B, n, n): the mean over each block, each image's blocks summing to 1.

    An image whose saliency is zero everywhere (a saturated or underflowed gradient) stays all
    zero instead of dividing by zero (the authors' code would give NaN there).
    """
    if saliency.dim() != 3 or saliency.shape[-1] != saliency.shape[-2]:
        raise ValueError(f"saliency must be a square (B, H, W) map, got {tuple(saliency.shape)}")
    size = _block_size(saliency.shape[-1], grid)
    pooled = F.avg_pool2d(saliency.float().unsqueeze(1), size).squeeze(1)
    total = pooled.sum((1, 2), keepdim=True)
    return pooled / total.clamp_min(torch.finfo(pooled.dtype).tiny)


# --- 2. the mask: energy and graph cut ------------------------------------------------------


def label_prior(lam: float, n_labels: int) -> Tensor:
    """(L,) float64: −log(P(z = j/(L−1)) + 1e-8) for j = 0 … L−1, P = Binomial(L−1, λ).

    `j` counts the parts of `x` in a block. For L = 2, 3, 4 these are the authors' priors
    (−log λ and −log(1−λ); −log λ², −log 2λ(1−λ), −log(1−λ)²; …), here for any L ≥ 2.
    """
    lam = check_lam(lam)
    if not isinstance(n_labels, int) or n_labels < 2:
        raise ValueError(f"n_labels must be an integer >= 2, got {n_labels!r}")
    m = n_labels - 1
    p = [math.comb(m, j) * lam**j * (1.0 - lam) ** (m - j) for j in range(n_labels)]
    return -torch.log(torch.tensor(p, dtype=torch.float64) + _PRIOR_EPS)


def boundary_distances(
    images: Tensor, partner: Tensor, grid: int, neigh_size: int
) -> tuple[Tensor, Tensor]:
    """The data term of each block boundary, for the four ways of filling its two blocks.

    Both images are average-pooled to cells of `min(neigh_size, block)` pixels. For the boundary
    between a block `u` and the block `v` below it (or to its right), and `a, b ∈ {0, 1}` saying
    which image fills `u` and `v` (1: `images`, 0: `partner`), `d_ab` is the mean over channels
    and over the cells along the boundary of |last cell row (column) of `u` in image a − first
    cell row (column) of `v` in image b|: how visibly the seam would show.

    Returns `(d_v, d_h)`, float32 on the input's device: `d_v[:, a, b]` of shape (B, n−1, n) for
    vertical neighbours (rows r, r+1), `d_h[:, a, b]` of shape (B, n, n−1) for horizontal ones.
    """
    _check_images(images)
    if partner.shape != images.shape:
        raise ValueError(
            f"partner must have the shape of images {tuple(images.shape)}, got "
            f"{tuple(partner.shape)}"
        )
    block = _block_size(images.shape[-1], grid)
    if not isinstance(neigh_size, int) or neigh_size < 1:
        raise ValueError(f"neigh_size must be a positive integer, got {neigh_size!r}")
    cell = min(neigh_size, block)
    if block % cell:
        raise ValueError(
            f"neigh_size {neigh_size} must divide the block size {block} (image side "
            f"{images.shape[-1]} / grid {grid})"
        )
    k = block // cell  # cells per block side
    pooled = {1: F.avg_pool2d(images.float(), cell), 0: F.avg_pool2d(partner.float(), cell)}
    last = slice(k - 1, grid * k - 1, k)  # the last cell row of blocks 0 … n−2
    first = slice(k, grid * k, k)  # the first cell row of blocks 1 … n−1
    b_, n = images.shape[0], grid
    d_v = images.new_zeros((b_, 2, 2, n - 1, n), dtype=torch.float32)
    d_h = images.new_zeros((b_, 2, 2, n, n - 1), dtype=torch.float32)
    for a in (0, 1):
        for b in (0, 1):
            pa, pb = pooled[a], pooled[b]
            dv = (pa[:, :, last, :] - pb[:, :, first, :]).abs().mean(1)  # (B, n−1, n·k)
            dh = (pa[:, :, :, last] - pb[:, :, :, first]).abs().mean(1)  # (B, n·k, n−1)
            d_v[:, a, b] = dv.reshape(b_, n - 1, n, k).mean(-1)
            d_h[:, a, b] = dh.reshape(b_, n, k, n - 1).mean(-2)
    return d_v, d_h


class PuzzleTerms(NamedTuple):
    """The energy of a mask, as coefficients (float64, CPU; B samples on an n × n grid).

    E(z) = Σ_b [z_b·cost_x_b + (1 − z_b)·cost_partner_b + prior[j_b]]
         + Σ_vertical w_v·(z_u − z_v)² + Σ_horizontal w_h·(z_u − z_v)²,   j_b = z_b·(L − 1).
    """

    cost_x: Tensor  # (B, n, n): per unit of z, the cost of showing `x` in a block
    cost_partner: Tensor  # (B, n, n): per unit of 1 − z, the cost of showing the partner
    prior: Tensor  # (L,): the λ prior of each label, already weighted by η/n²
    w_v: Tensor  # (B, n−1, n): weight of (z_u − z_v)² between rows r and r+1
    w_h: Tensor  # (B, n, n−1): weight of (z_u − z_v)² between columns c and c+1

    @property
    def n_labels(self) -> int:
        return self.prior.shape[0]

    @property
    def grid(self) -> int:
        return self.cost_x.shape[-1]


def puzzle_terms(
    saliency: Tensor,
    saliency_partner: Tensor,
    images: Tensor,
    partner: Tensor,
    lam: float,
    options: PuzzleOptions = DEFAULT_PUZZLE,
) -> PuzzleTerms:
    """The PuzzleMix mask energy of each sample, as the authors' graph cut minimises it.

    `saliency`, `saliency_partner`: (B, n, n) block saliencies s, s' (from `block_saliency`, each
    summing to 1); `images`, `partner`: (B, C, H, W) in the units the seams are measured in (the
    authors': pixel values in [0, 1], i.e. normalised images times the data std). `options`
    give L = `n_labels`, β, γ, η and `neigh_size` (the rest is not used here). With β' =
    β / (16 n) (the authors' normalisation of β by the grid), the energy of a mask z is

        E(z) = Σ_b [z_b s'_b + (1 − z_b) s_b]                      saliency of what is covered
             + (η / n²) Σ_b −log(P_λ(z_b) + 1e-8)                   λ prior (`label_prior`)
             + β' Σ_(u,v) (z_u − z_v)²                               label smoothness
             + β'γ Σ_(u,v) D_uv(z_u, z_v)                           data smoothness (seams)

    over 4-neighbour pairs (u above or left of v), with `d_ab` of `boundary_distances` and

        D_uv(z_u, z_v) = z_u (d10 + d11)/2 + (1 − z_u)(d00 + d01)/2
                       + z_v (d01 + d11)/2 + (1 − z_v)(d00 + d10)/2
                       + (z_u − z_v)² (d10 + d01 − d00 − d11)/2.

    For a two-valued mask D_uv = d_{z_u z_v} + (d01 + d10)/2: the seam actually shown plus a
    constant. For intermediate labels it is the authors' extension (linear unaries plus the
    quadratic label cost), which keeps the energy in the unary + w·(z_u − z_v)² form that gco
    takes. The terms come back as `PuzzleTerms` (float64, on the CPU).
    """
    if saliency.dim() != 3 or saliency.shape[-1] != saliency.shape[-2]:
        raise ValueError(f"saliency must be a (B, n, n) grid, got {tuple(saliency.shape)}")
    batch, grid = saliency.shape[0], saliency.shape[-1]
    _check_grid(saliency_partner, batch, grid, "saliency_partner")
    _check_images(images)
    if images.shape[0] != batch:
        raise ValueError(f"images must hold {batch} samples (as saliency), got {images.shape[0]}")
    beta, gamma, eta = (_check_nonneg(getattr(options, k), k) for k in ("beta", "gamma", "eta"))
    prior = label_prior(lam, options.n_labels) * (eta / grid**2)
    distances = boundary_distances(images, partner, grid, options.neigh_size)
    d_v, d_h = (d.double().cpu() for d in distances)
    beta_n = beta / grid / 16.0
    seam = beta_n * gamma
    cost_x = saliency_partner.detach().double().cpu().clone()
    cost_partner = saliency.detach().double().cpu().clone()
    # each boundary's data term, split onto its two blocks (linear in z) ...
    cost_x[:, :-1, :] += seam * (d_v[:, 1, 0] + d_v[:, 1, 1]) / 2
    cost_partner[:, :-1, :] += seam * (d_v[:, 0, 0] + d_v[:, 0, 1]) / 2
    cost_x[:, 1:, :] += seam * (d_v[:, 0, 1] + d_v[:, 1, 1]) / 2
    cost_partner[:, 1:, :] += seam * (d_v[:, 0, 0] + d_v[:, 1, 0]) / 2
    cost_x[:, :, :-1] += seam * (d_h[:, 1, 0] + d_h[:, 1, 1]) / 2
    cost_partner[:, :, :-1] += seam * (d_h[:, 0, 0] + d_h[:, 0, 1]) / 2
    cost_x[:, :, 1:] += seam * (d_h[:, 0, 1] + d_h[:, 1, 1]) / 2
    cost_partner[:, :, 1:] += seam * (d_h[:, 0, 0] + d_h[:, 1, 0]) / 2
    # ... and the rest of it on the label difference, with the label smoothness
    w_v = beta_n + seam * (d_v[:, 1, 0] + d_v[:, 0, 1] - d_v[:, 0, 0] - d_v[:, 1, 1]) / 2
    w_h = beta_n + seam * (d_h[:, 1, 0] + d_h[:, 0, 1] - d_h[:, 0, 0] - d_h[:, 1, 1]) / 2
    return PuzzleTerms(cost_x, cost_partner, prior, w_v, w_h)


def _labels_of(mask: Tensor, n_labels: int) -> Tensor:
    """Mask values z → label j = z·(L−1); ValueError unless every z is on that lattice."""
    j = mask.double() * (n_labels - 1)
    rounded = j.round()
    if ((j - rounded).abs() > 1e-6).any() or (rounded < 0).any() or (rounded > n_labels - 1).any():
        raise ValueError(
            f"mask values must be among {{0, 1/{n_labels - 1}, …, 1}} for n_labels={n_labels}"
        )
    return rounded.long()


def puzzle_energy(mask: Tensor, terms: PuzzleTerms) -> Tensor:
    """E(z) of `puzzle_terms` for masks z of shape (..., B, n, n) → (..., B) float64.

    Leading dimensions broadcast against the terms' batch, so all 2^(n²) masks of one sample can
    be scored at once (mask (M, 1, n, n) with terms of one sample → (M, 1)).
    """
    n = terms.grid
    if mask.dim() < 3 or mask.shape[-2:] != (n, n):
        raise ValueError(f"mask must have shape (..., B, {n}, {n}), got {tuple(mask.shape)}")
    z = mask.detach().double().cpu()
    labels = _labels_of(z, terms.n_labels)
    unary = z * terms.cost_x + (1 - z) * terms.cost_partner + terms.prior[labels]
    pair_v = terms.w_v * (z[..., 1:, :] - z[..., :-1, :]) ** 2
    pair_h = terms.w_h * (z[..., :, 1:] - z[..., :, :-1]) ** 2
    return unary.sum((-2, -1)) + pair_v.sum((-2, -1)) + pair_h.sum((-2, -1))


def _grid_edges(batch: int, n: int) -> np.ndarray:
    """(E, 2) site pairs of B disjoint n × n grids: vertical edges, then horizontal ones, each
    in (sample, row, column) order (the order of w_v and w_h flattened)."""
    sites = np.arange(batch * n * n).reshape(batch, n, n)
    vertical = np.stack([sites[:, :-1, :].ravel(), sites[:, 1:, :].ravel()], 1)
    horizontal = np.stack([sites[:, :, :-1].ravel(), sites[:, :, 1:].ravel()], 1)
    return np.concatenate([vertical, horizontal]).astype(np.int32)


def graphcut_mask(terms: PuzzleTerms) -> Tensor:
    """The mask minimising E of `terms` per sample, by gco's α-β swap → (B, n, n) float32 (CPU).

    All samples go to gco as one graph of B disjoint grids (one call, no Python loop); the
    energy is separable, so each sample gets its own minimum. With two labels one swap move is a
    single min-cut: the exact minimum of the rounded energy (each sample's terms are scaled so
    its largest is `GRAPHCUT_RESOLUTION`, then rounded to integers: every term is within 2⁻²¹ of
    the largest one of its sample). With more labels α-β swap gives a local minimum (no swap of
    two labels lowers E), as in the authors' code. gco's label j here is z = 1 − j/(L−1), as the
    authors', so the swap starts from the same all-`x` labelling; gco draws nothing at random.

    An edge weight below 0 (possible only when γ·(seam differences) < −1, i.e. not at the
    authors' γ = 0.5 on images in [0, 1]) is set to 0, since a min-cut needs it ≥ 0.
    """
    import gco

    n, n_labels = terms.grid, terms.n_labels
    batch = terms.cost_x.shape[0]
    z_of_label = 1.0 - torch.arange(n_labels, dtype=torch.float64) / (n_labels - 1)
    # unary (B, n, n, L): gco label j ↔ z_j; per site, subtract its smallest (argmin unchanged)
    unary = (
        z_of_label * terms.cost_x[..., None]
        + (1 - z_of_label) * terms.cost_partner[..., None]
        + terms.prior.flip(0)  # prior is indexed by j = z·(L−1), gco's label by 1 − z
    )
    unary = unary - unary.amin(-1, keepdim=True)
    w_v, w_h = terms.w_v.clamp_min(0), terms.w_h.clamp_min(0)
    # (z_u − z_v)² = (j_u − j_v)² / (L−1)²: integer label matrix, weight divided by (L−1)²
    label_cost = (np.arange(n_labels)[:, None] - np.arange(n_labels)[None, :]) ** 2
    squared_step = (n_labels - 1) ** 2
    largest = torch.cat([unary.flatten(1), w_v.flatten(1), w_h.flatten(1)], 1).amax(1)
    scale = GRAPHCUT_RESOLUTION / largest.clamp_min(1e-300)  # (B,)
    unary_int = (unary * scale[:, None, None, None]).round().numpy().astype(np.int32)
    weights = torch.cat(
        [
            (w_v * scale[:, None, None] / squared_step).flatten(),
            (w_h * scale[:, None, None] / squared_step).flatten(),
        ]
    )
    weights_int = weights.round().numpy().astype(np.int32)
    edges = _grid_edges(batch, n)
    if edges.shape[0] == 0:  # a 1 × 1 grid: no pairs, the unary decides
        labels = unary_int.reshape(batch * n * n, n_labels).argmin(1)
    else:
        labels = gco.cut_general_graph(
            edges,
            weights_int,
            unary_int.reshape(batch * n * n, n_labels),
            label_cost.astype(np.int32),
            algorithm="swap",
            down_weight_factor=1,  # integers as given: gco-wrapper's own rescaling would round
        )
    labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).reshape(batch, n, n)
    return z_of_label[labels].float()


# --- 3. transport ---------------------------------------------------------------------------


def _position_cost(m: int) -> Tensor:
    """(m², m²) float32: squared grid distance between blocks, divided by (m − 1)² (so the far
    corner is at 2), as the authors' cost matrix."""
    r, c = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    r, c = r.flatten().float(), c.flatten().float()
    d = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    return d / max(m - 1, 1) ** 2


def transport_cost(saliency: Tensor, keep: Tensor, t_eps: float) -> Tensor:
    """(B, N, N) cost of moving source block i to destination j (N = m², row-major):
    `t_eps · ‖pos_i − pos_j‖² / (m−1)² − s_i · keep_j`, with `s` the (B, m, m) block saliency and
    `keep` where the image's mask shows it (mask > 0). Minimising its sum over a permutation
    puts salient blocks on kept positions without moving them far (the paper's transport)."""
    if saliency.dim() != 3 or saliency.shape[-1] != saliency.shape[-2]:
        raise ValueError(f"saliency must be a (B, m, m) grid, got {tuple(saliency.shape)}")
    if keep.shape != saliency.shape:
        raise ValueError(
            f"keep must have the saliency's shape {tuple(saliency.shape)}, got {tuple(keep.shape)}"
        )
    t_eps = _check_nonneg(t_eps, "t_eps")
    m = saliency.shape[-1]
    s = saliency.float().flatten(1)
    kept = keep.flatten(1).float()
    return t_eps * _position_cost(m).to(s.device) - s[:, :, None] * kept[:, None, :]


def greedy_assignment(cost: Tensor, rounds: int) -> Tensor:
    """The authors' approximate solver of min Σ_i cost[i, σ(i)]: `rounds` rounds of bidding.

    Each round, every source block i bids for its cheapest destination (lowest index on ties).
    Each destination then takes the argmin, first index on ties, of its column of bids in which
    every source that did not bid there counts as 0 (the authors' `min` over `plan * cost`):
    the lowest bid wins if it is below 0, or if every source bid there; a lowest bid of exactly
    0 wins only if no non-bidder has a lower index; otherwise (and for a destination no one bid
    for) there is no winner. Each losing bidder's cost for the destination it bid on rises by 1,
    and the next round bids again from scratch. The winners of the last round are the answer:
    an injective partial assignment (a source may end up nowhere, a destination empty), as in
    their `mask_transport`, which runs `rounds` = grid side rounds.

    Each round is one pass over the (B, N, N) costs (the bids) and O(B·N) scatters.
    `cost`: (B, N, N), rows sources, columns destinations. Returns (B, N) int64: for each
    destination the source block it receives, or −1 for none.
    """
    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(
            f"cost must be a (B, N, N) batch of square matrices, got {tuple(cost.shape)}"
        )
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    cost = cost.float().clone()
    batch, n = cost.shape[:2]
    index = torch.arange(n, device=cost.device).expand(batch, n)
    for _ in range(rounds):
        choice = cost.argmin(2)  # (B, N): each source's destination
        bid = cost.gather(2, choice[..., None]).squeeze(-1)  # (B, N): its cost there
        lowest = torch.full_like(bid, math.inf).scatter_reduce(1, choice, bid, "amin")
        at_lowest = torch.where(bid == lowest.gather(1, choice), index, n)
        first = torch.full_like(choice, n).scatter_reduce(1, choice, at_lowest, "amin")
        bidders = torch.zeros_like(choice).scatter_add(1, choice, torch.ones_like(choice))
        # the lowest-indexed source that did not bid for a destination: row 0, except for the
        # destination of row 0, where it is the first row that chose elsewhere (N if none)
        first_other = torch.where(choice != choice[:, :1], index, n).amin(1, keepdim=True)
        no_bid_first = torch.where(index == choice[:, :1], first_other, 0)
        taken = ((bidders == n) | (lowest < 0) | ((lowest == 0) & (first < no_bid_first))) & (
            bidders > 0
        )
        won = taken.gather(1, choice) & (first.gather(1, choice) == index)  # per source
        cost.scatter_add_(2, choice[..., None], (~won)[..., None].to(cost.dtype))
    return torch.where(taken, first, torch.full_like(first, -1))


def exact_assignment(cost: Tensor) -> Tensor:
    """The optimal permutation for each (N, N) cost (SciPy's Hungarian-type solver, on the CPU,
    one sample at a time). Returns (B, N) int64 on the cost's device: the source of each
    destination. Every block lands somewhere, so no destination is left empty."""
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(
            f"cost must be a (B, N, N) batch of square matrices, got {tuple(cost.shape)}"
        )
    host = cost.detach().double().cpu().numpy()
    source = np.empty(host.shape[:2], dtype=np.int64)
    for b, c in enumerate(host):
        rows, cols = linear_sum_assignment(c)
        source[b, cols] = rows
    return torch.from_numpy(source).to(cost.device)


def move_blocks(images: Tensor, source: Tensor, grid: int) -> Tensor:
    """Block j of the output is block `source[:, j]` of `images` (zero where source is −1), on an
    m × m grid (`grid` = m) in row-major order."""
    _check_images(images)
    size = _block_size(images.shape[-1], grid)
    b, c, h, _ = images.shape
    if source.shape != (b, grid * grid):
        raise ValueError(f"source must have shape {(b, grid * grid)}, got {tuple(source.shape)}")
    blocks = images.reshape(b, c, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(b, grid * grid, c * size * size)
    index = source.clamp_min(0)[..., None].expand(-1, -1, blocks.shape[-1])
    moved = blocks.gather(1, index) * (source >= 0)[..., None].to(blocks.dtype)
    moved = moved.reshape(b, grid, grid, c, size, size).permute(0, 3, 1, 4, 2, 5)
    return moved.reshape(b, c, h, h)


def transport(
    images: Tensor,
    saliency: Tensor,
    keep: Tensor,
    t_eps: float,
    solver: Literal["authors", "exact"] = "authors",
) -> Tensor:
    """Move each image's salient blocks to where `keep` (B, m, m) shows the image: the assignment
    of `transport_cost` by the authors' greedy bidding (m rounds) or exactly."""
    cost = transport_cost(saliency, keep, t_eps)
    if solver == "authors":
        source = greedy_assignment(cost, rounds=saliency.shape[-1])
    elif solver == "exact":
        source = exact_assignment(cost)
    else:
        raise ValueError(f"solver must be 'authors' or 'exact', got {solver!r}")
    return move_blocks(images, source, saliency.shape[-1])


# --- 4. the mixed batch and its loss --------------------------------------------------------


def _upsample(mask: Tensor, factor: int) -> Tensor:
    return mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def mix_by_mask(images: Tensor, partner: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """`z·x + (1 − z)·x'` with the (B, n, n) mask repeated over each block's pixels; → (mixed,
    per-sample λ = mean of z, float32 (B,))."""
    _check_images(images)
    if partner.shape != images.shape:
        raise ValueError(
            f"partner must have shape {tuple(images.shape)}, got {tuple(partner.shape)}"
        )
    b, n = images.shape[0], mask.shape[-1]
    _check_grid(mask, b, n, "mask")
    z = _upsample(mask.to(images.device, images.dtype), _block_size(images.shape[-1], n))
    z = z.unsqueeze(1)
    return z * images + (1 - z) * partner, mask.float().mean((1, 2)).to(images.device)


def puzzle_mask(
    images: Tensor,
    perm: Tensor,
    saliency: Tensor,
    lam: float,
    grid: int,
    options: PuzzleOptions = DEFAULT_PUZZLE,
) -> Tensor:
    """The PuzzleMix mask of (B, C, H, W) `images` and `images[perm]` on an n × n grid (`grid` =
    n): block saliencies, `puzzle_terms` and `graphcut_mask` → (B, n, n) on the images' device.

    `saliency`: (B, H, W) per-pixel saliency (`saliency_norm` of the clean loss's input
    gradient); `lam`: the drawn λ, which enters only through the prior; the seams are measured
    on `images · options.pixel_std` when it is given.
    """
    _check_images(images)
    _check_perm(perm, images.shape[0])
    side = images.shape[-1]
    if saliency.shape != (images.shape[0], side, side):
        raise ValueError(
            f"saliency must have shape (B, H, W) = {(images.shape[0], side, side)}, got "
            f"{tuple(saliency.shape)}"
        )
    scaled = images
    pixel_std = options.pixel_std
    if pixel_std is not None:
        if len(pixel_std) != images.shape[1] or min(pixel_std) <= 0:
            raise ValueError(
                f"pixel_std must hold {images.shape[1]} positive values (one per channel), got "
                f"{list(pixel_std)}"
            )
        scaled = images * torch.tensor(pixel_std, device=images.device).view(1, -1, 1, 1)
    s = block_saliency(saliency, grid)
    terms = puzzle_terms(s, s[perm], scaled, scaled[perm], lam, options)
    return graphcut_mask(terms).to(images.device)


def puzzle_transport(
    images: Tensor,
    perm: Tensor,
    saliency: Tensor,
    mask: Tensor,
    options: PuzzleOptions = DEFAULT_PUZZLE,
) -> tuple[Tensor, Tensor]:
    """`images` and `images[perm]` with their salient blocks moved to where the (B, n, n) `mask`
    shows each (`transport`), ready for `mix_by_mask` with the same mask.

    Transport works on blocks of `min(options.t_size, H/n)` pixels (None: the mask's blocks):
    the mask is repeated to that grid and the (B, H, W) `saliency` pooled on it.
    """
    _check_images(images)
    _check_perm(perm, images.shape[0])
    side, t_size = images.shape[-1], options.t_size
    block = _block_size(side, mask.shape[-1], "the mask's grid")
    if t_size is not None and (not isinstance(t_size, int) or t_size < 1):
        raise ValueError(f"t_size must be a positive integer or None, got {t_size!r}")
    t_block = block if t_size is None else min(t_size, block)
    if block % t_block:
        raise ValueError(f"t_size {t_size} must divide the block size {block}")
    mask_t = _upsample(mask, block // t_block)
    s_t = block_saliency(saliency, side // t_block)
    moved = transport(images, s_t, mask_t > 0, options.t_eps, options.solver)
    return moved, transport(images[perm], s_t[perm], mask_t < 1, options.t_eps, options.solver)
