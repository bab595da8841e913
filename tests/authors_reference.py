"""Independent references for the AlignMixup operator, written out plainly from the authors'
code and the paper's equations, never from pipeline.mixing: the authors' Sinkhorn loop as
published (tests/unit/test_sinkhorn.py checks the solver against it, benchmarks/bench_align.py times
it), their broadcast cost, POT's solver for the converged plan, and eqs. 11-12.

The authors' loop reads the stopping error on the host (`.item()`) every iteration, as their
code does. Everything runs in the dtype it is given, so a float64 run is the exact reference
and a float32 run shows the error of their own code.
"""

from __future__ import annotations

import numpy as np
import ot
import torch


def authors_sinkhorn(
    cost: torch.Tensor, eps: float = 0.1, max_iter: int = 100
) -> tuple[torch.Tensor, int]:
    """Plan `P` (B, r, s) for raw costs and the number of iterations run, in `cost`'s dtype."""
    batch, r, s = cost.shape
    mu = torch.full((batch, r), 1.0 / r, dtype=cost.dtype, device=cost.device)
    nu = torch.full((batch, s), 1.0 / s, dtype=cost.dtype, device=cost.device)
    u, v = torch.zeros_like(mu), torch.zeros_like(nu)

    def kernel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (-cost + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps

    iterations = 0
    for _ in range(max_iter):
        u_prev = u
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp(kernel(u, v), dim=-1)) + u
        v = (
            eps * (torch.log(nu + 1e-8) - torch.logsumexp(kernel(u, v).transpose(-2, -1), dim=-1))
            + v
        )
        err = (u - u_prev).abs().sum(-1).mean()
        iterations += 1
        if err.item() < 0.1:
            break
    return torch.exp(kernel(u, v)), iterations


def positions(a: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) features as (B, r, c): row i is the feature vector at position i."""
    return a.flatten(2).transpose(1, 2)


def authors_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Their `_cost_matrix`: Σ_k |x_ik − y_jk|² through a broadcast (B, r, s, c) difference."""
    return torch.sum(torch.abs(x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2, -1)


def authors_assignment(
    a: torch.Tensor, a_partner: torch.Tensor, dtype: torch.dtype, eps: float = 0.1
) -> torch.Tensor:
    """R = r·P for features (B, c, h, w), their cost and loop run in `dtype`."""
    x, y = positions(a).to(dtype), positions(a_partner).to(dtype)
    plan, _ = authors_sinkhorn(authors_cost(x, y), eps=eps)
    return plan * plan.shape[1]


def pot_assignment(a: torch.Tensor, a_partner: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """R = r·P* (float64) with P* from POT's log-domain Sinkhorn run to 1e-9 on each sample's
    cost divided by its mean (ε relative to the typical cost), uniform marginals."""
    x, y = positions(a).double(), positions(a_partner).double()
    cost = authors_cost(x, y).detach().numpy()
    plans = []
    for m in cost:
        r, s = m.shape
        plans.append(
            ot.bregman.sinkhorn_log(
                np.full(r, 1 / r), np.full(s, 1 / s), m / m.mean(), eps, 10_000, 1e-9
            )
        )
    return torch.from_numpy(np.stack(plans)) * cost.shape[1]


def aligned_mix(
    a: torch.Tensor, a_partner: torch.Tensor, assignment: torch.Tensor, lam: float, direction: int
) -> torch.Tensor:
    """Eq. 11 (direction 0): λA + (1−λ)A'Rᵀ, or eq. 12 (direction 1): λAR + (1−λ)A', computed
    in `assignment`'s dtype, returned as (B, c, h, w)."""
    dtype = assignment.dtype
    A, Ap = a.flatten(2).to(dtype), a_partner.flatten(2).to(dtype)  # (B, c, r)
    if direction == 0:
        out = lam * A + (1 - lam) * torch.bmm(Ap, assignment.transpose(1, 2))
    else:
        out = lam * torch.bmm(A, assignment) + (1 - lam) * Ap
    return out.view(a.shape)
