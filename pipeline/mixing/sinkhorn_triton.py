"""The batched Sinkhorn solver as fused Triton kernels, for CUDA: one custom op, ≤ 3 launches.

Why by hand: the eager solver in `sinkhorn.py` queues ~37 small kernels per iteration, ~3,700
per solve of the authors' 100 iterations, and on a GPU those launches (6–9 µs of host time
each) cost more than an aligned step's arithmetic. POT and geomloss launch per iteration too,
and KeOps and geomloss's multiscale solvers target one large problem, not a batch of small
ones; none implements the authors' batch-mean exit rule. Here every sample's r × s problem
(r, s ≤ 64: A of 4 × 4, 7 × 7 or 8 × 8) stays in one program's registers for all its
iterations:

- authors' mode, 3 launches: `authors_trace` runs every iteration of every sample and
  records each sample's Σ|u − u_prev| per iteration; `authors_plan` finds, on the device,
  the first iteration whose batch mean is below 0.1 (or the last), runs each sample's
  iterations again up to it (the same code, so the same potentials) and writes the plan;
  `reduce` gives the batch's iteration count and largest marginal error. No host sync.
- converged mode, 2 launches: `converged_plan` iterates each sample until its own marginal
  error is below `tol` at a check (every `check_every` iterations) or `max_iter` runs out,
  writes its plan, error and iteration count; then `reduce`.

The arithmetic follows the eager solver's order of operations (log-domain potentials, the
−87 floor inside logsumexp), so plans agree to float32 rounding;
`tests/unit/test_sinkhorn_triton.py` checks that under Triton's interpreter (`TRITON_INTERPRET=1`
runs the kernels on CPU tensors).
The solve is one custom op (`torch.library.custom_op`, `alignmixup::sinkhorn`) with a fake
implementation: one op to the dispatcher, counted as such on FakeTensors, and one node to
`torch.compile`, which calls it without a graph break.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from pipeline.mixing.sinkhorn_constants import AUTHORS_LOG_OFFSET, AUTHORS_THRESHOLD

__all__ = ["MAX_SIDE", "available", "fits", "fused_sinkhorn", "runs_on"]

MAX_SIDE = 64  # the largest r or s held in one program's registers
_MODES = {"authors": 0, "converged": 1}


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors): TRITON_INTERPRET=1,
    which must be set before Triton is first imported (its own helpers are made then)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(device: torch.device) -> bool:
    """Whether the op can take tensors on `device`: CUDA (or the CPU under Triton's
    interpreter, for tests) with Triton importable, or "meta", where only shapes are computed
    (no kernel runs: how benchmarks/bench_launches.py counts a CUDA step's ops)."""
    if device.type == "meta":
        return True
    on = device.type == "cuda" or (device.type == "cpu" and interpreted())
    return on and available()


def fits(cost: Tensor) -> bool:
    """Whether a (B, r, s) cost fits one program's tile: r, s ≤ 64 (and B ≥ 1)."""
    return cost.shape[0] >= 1 and cost.shape[1] <= MAX_SIDE and cost.shape[2] <= MAX_SIDE


def _blocks(r: int, s: int) -> tuple[int, int, int]:
    """Tile sides (powers of two, at least 16) and warps for an r × s problem."""
    import triton

    block_r, block_s = max(16, triton.next_power_of_2(r)), max(16, triton.next_power_of_2(s))
    tile = block_r * block_s
    return block_r, block_s, 4 if tile >= 2048 else (2 if tile >= 512 else 1)


def _log_marginal(n: int) -> float:
    """log(1/n + 1e-8) in float32, as the authors' (and the eager solver's) marginals."""
    return float(torch.log(torch.tensor(1.0 / n, dtype=torch.float32) + AUTHORS_LOG_OFFSET))


@torch.library.custom_op("alignmixup::sinkhorn", mutates_args=())
def _sinkhorn_op(
    cost: Tensor, eps: float, max_iter: int, mode: int, tol: float, check_every: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(plan, iterations as 0-dim int64, largest marginal error as 0-dim float32) of a
    contiguous float32 (B, r, s) cost; `mode` 0 is the authors', 1 converged."""
    batch, r, s = cost.shape
    block_r, block_s, warps = _blocks(r, s)
    from pipeline.mixing import sinkhorn_kernels as kernels  # needs Triton: imported here

    plan = torch.empty_like(cost)
    stats = torch.empty(batch, dtype=torch.float32, device=cost.device)
    iters = torch.empty(batch, dtype=torch.int32, device=cost.device)
    error = torch.empty((), dtype=torch.float32, device=cost.device)
    iterations = torch.empty((), dtype=torch.int64, device=cost.device)
    grid = (batch,)
    if mode == 0:
        errs = torch.empty(max_iter, batch, dtype=torch.float32, device=cost.device)
        log_mu, log_nu = _log_marginal(r), _log_marginal(s)
        kernels.authors_trace[grid](
            cost, errs, batch, r, s, eps, log_mu, log_nu, max_iter,
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
        kernels.authors_plan[grid](
            cost, errs, plan, stats, iters, batch, r, s, eps, log_mu, log_nu, max_iter,
            AUTHORS_THRESHOLD, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_B=128, num_warps=warps,
        )  # fmt: skip
    else:
        log_r, log_s = -math.log(r), -math.log(s)  # as the eager solver's scalars
        kernels.converged_plan[grid](
            cost, plan, stats, iters, r, s, eps, log_r, log_s, max_iter, tol, check_every,
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=warps,
        )  # fmt: skip
    kernels.reduce[(1,)](stats, iters, error, iterations, batch, BLOCK_B=256, num_warps=4)
    return plan, iterations, error


@_sinkhorn_op.register_fake
def _(cost: Tensor, eps: float, max_iter: int, mode: int, tol: float, check_every: int):
    """Shapes only, for FakeTensor and torch.compile: no kernel is built or run."""
    return (
        torch.empty_like(cost),
        cost.new_empty((), dtype=torch.int64),
        cost.new_empty((), dtype=torch.float32),
    )


def fused_sinkhorn(
    cost: Tensor, eps: float, max_iter: int, mode: str, tol: float, check_every: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`sinkhorn`'s result from the fused kernels: (plan, iterations, marginal error), all on
    `cost`'s device, which `runs_on`; the cost must `fit`."""
    return _sinkhorn_op(cost.contiguous(), eps, max_iter, _MODES[mode], tol, check_every)
