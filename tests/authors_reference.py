"""The AlignMixup authors' Sinkhorn loop as published, written out plainly: the reference that
tests/test_sinkhorn.py checks the pipeline's solver against and benchmarks/bench_align.py times.

It reads the stopping error on the host (`.item()`) every iteration, as their code does.
"""

from __future__ import annotations

import torch


def authors_sinkhorn(
    cost: torch.Tensor, eps: float = 0.1, max_iter: int = 100
) -> tuple[torch.Tensor, int]:
    """Plan `P` (B, r, s) for raw costs and the number of iterations run."""
    batch, r, s = cost.shape
    mu = torch.full((batch, r), 1.0 / r, device=cost.device)
    nu = torch.full((batch, s), 1.0 / s, device=cost.device)
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
