"""Squared-distance costs and a batched log-domain Sinkhorn solver (docs/mixing.md).

Written by hand: POT and geomloss solve the same problem, but neither reproduces the
AlignMixup authors' stopping rule bit for bit, batches the small r×r problems of a whole
training batch on the GPU without a host sync per iteration, and stays out of autograd.

Two backends compute the same plans: this module's eager loop (any device, any size) and the
fused Triton kernels of `sinkhorn_triton.py` (CUDA, r and s ≤ 64; ≤ 3 launches per solve
instead of ~37 per iteration). `backend="auto"` takes the fused one wherever it applies.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from pipeline.mixing.sinkhorn_constants import AUTHORS_LOG_OFFSET, AUTHORS_THRESHOLD

__all__ = [
    "BACKENDS",
    "DEFAULT_SINKHORN",
    "MODES",
    "SinkhornOptions",
    "SinkhornResult",
    "sinkhorn",
    "squared_cost",
]

MODES = ("authors", "converged")
BACKENDS = ("auto", "eager", "triton")
# exp() floor inside logsumexp: float32 exp(-87) is still a normal number (see _logsumexp_).
_EXP_FLOOR = -87.0
# Default iteration caps when `max_iter` is None.
_DEFAULT_MAX_ITER = {"authors": 100, "converged": 1000}


@dataclass(frozen=True)
class SinkhornOptions:
    """How `sinkhorn` solves, as one value: `align`, `align_mix` and the methods' settings pass
    it on whole instead of repeating six keywords (see `sinkhorn` for each field)."""

    mode: Literal["authors", "converged"] = "authors"
    eps: float = 0.1
    max_iter: int | None = None  # None: 100 for "authors", 1000 for "converged"
    tol: float = 1e-3
    check_every: int = 10
    host_checks: bool | None = None
    backend: Literal["auto", "eager", "triton"] = "auto"


DEFAULT_SINKHORN = SinkhornOptions()  # the authors' solver, where no options are given


class SinkhornResult(NamedTuple):
    """A transport plan and how it was reached."""

    plan: Tensor  # (B, r, s) float32, marginals 1/r (rows) and 1/s (columns)
    # Sinkhorn iterations whose potentials made `plan`: an int, or with host_checks=False a
    # 0-dim int64 tensor on the device (int() of it is a host sync)
    iterations: int | Tensor
    marginal_error: Tensor  # 0-dim float32: max over the batch of |r·row sum − 1|, |s·col sum − 1|


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device` (a no-op on "meta", which has no autocast), so that
    costs and plans stay float32 under a bf16/fp16 step."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def squared_cost(a: Tensor, b: Tensor) -> Tensor:
    """Batched ‖a_i − b_j‖² in float32 from matrix products, never a (B, r, s, c) tensor."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"squared_cost expects a (B, r, c) and b (B, s, c) with equal B and c, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    with autocast_off(a.device):
        a, b = a.float(), b.float()
        # vector_norm reduces without a (B, r, c) temporary, unlike a.square().sum(-1).
        norms_a = torch.linalg.vector_norm(a, dim=-1).square()
        norms_b = torch.linalg.vector_norm(b, dim=-1).square()
        norms = norms_a[:, :, None] + norms_b[:, None, :]
        # ‖a‖² + ‖b‖² − 2 a·bᵀ can dip below 0 by rounding; a distance cannot.
        return torch.baddbmm(norms, a, b.transpose(1, 2), alpha=-2.0).clamp_min(0.0)


def sinkhorn(cost: Tensor, options: SinkhornOptions = DEFAULT_SINKHORN) -> SinkhornResult:
    """Entropic OT plan with uniform marginals for a batch of (r, s) costs, in float32.

    The fields of `options` (`SinkhornOptions`) choose the solver:

    `mode="authors"` reproduces the AlignMixup authors' solver: raw costs, absolute `eps`,
    potentials from 0, exit after the first iteration where the batch mean of Σ|u − u_prev|
    is below 0.1 (fixed; `tol` is not used), at most `max_iter` iterations. Their loop reads
    the error on the host every iteration; here the iterations run in chunks of
    `check_every` with the errors and potentials kept on the device, one host sync per
    chunk, and the potentials of the chunk's first iteration that met the rule are kept,
    so the result is that of the per-iteration loop.

    `mode="converged"` solves the problem to a stated accuracy instead: each sample's cost
    is divided by its mean, so `eps` is relative to the typical cost and the plan does not
    depend on the feature magnitude (train-mode ResNet-50 costs ≈ 1,500, eval-mode ≈ 3.4).
    It alternates row and column updates of the log-domain potentials and, every
    `check_every` iterations, stops each sample whose plan satisfies
    max(|r·row sum − 1|, |s·column sum − 1|) < `tol` (its potentials stay as they are), until
    every sample has stopped (one host sync per check). `iterations` is the most any sample
    ran. If `max_iter` runs out first, a RuntimeWarning says so and the last plans are
    returned.

    `max_iter=None` means 100 for "authors" and 1000 for "converged".

    `host_checks=False` reads nothing on the host, so the solver never waits for the device
    (on a GPU, a host sync per chunk idles the launch queue): all `max_iter` iterations are
    queued, and on the device the potentials stop changing at the iteration where the
    stopping rule is first met, so the plan, and the iteration count (returned as a 0-dim
    tensor), are those of the host-checked loop, bit for bit. The iterations after that cost
    time but change nothing. In converged mode the rule is checked every `check_every`
    iterations, and no warning can say that `max_iter` ran out: `marginal_error` tells.
    `host_checks=None` means False for the authors' mode on CUDA (whose 100 iterations all
    run on train-mode features anyway), for the fused backend and on "meta" tensors, and True
    otherwise (CPUs gain from stopping early, and converged mode's cap of 1000 is ~10× what
    it needs).

    `backend`: "eager" is the loop above; "triton" the fused kernels (`sinkhorn_triton`), which
    stop on the device and never sync, whatever `host_checks` says: `iterations` is then a
    0-dim tensor and converged mode cannot warn. They need CUDA tensors (or CPU tensors under
    TRITON_INTERPRET=1) and r, s ≤ 64; larger problems fall back to the eager loop. "auto"
    (the default) uses them wherever they apply.

    With host checks, a cost holding NaN or ±inf raises ValueError (a sync, so never on the
    CUDA default path: there a non-finite cost gives a NaN plan, and the trainer stops on the
    NaN loss it causes, naming the step).
    """
    mode, eps, tol, check_every = options.mode, options.eps, options.tol, options.check_every
    max_iter, host_checks, backend = options.max_iter, options.host_checks, options.backend
    if mode not in MODES:
        raise ValueError(f"sinkhorn mode must be one of {MODES}, got {mode!r}")
    if cost.dim() != 3 or cost.shape[1] < 1 or cost.shape[2] < 1:
        raise ValueError(f"sinkhorn expects a (B, r, s) cost, got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn eps must be > 0, got {eps}")
    if max_iter is None:
        max_iter = _DEFAULT_MAX_ITER[mode]
    if max_iter < 1 or check_every < 1:
        raise ValueError(
            f"sinkhorn max_iter and check_every must be >= 1, got {max_iter} and {check_every}"
        )
    if not tol > 0:
        raise ValueError(f"sinkhorn tol must be > 0, got {tol}")
    if backend not in BACKENDS:
        raise ValueError(f"sinkhorn backend must be one of {BACKENDS}, got {backend!r}")
    from pipeline.mixing import sinkhorn_triton

    runs = sinkhorn_triton.runs_on(cost.device)
    # "auto" never picks the interpreter: CPU tensors go to the eager loop unless told.
    fused = (
        runs
        and sinkhorn_triton.fits(cost)
        and (backend == "triton" or (backend == "auto" and cost.device.type == "cuda"))
    )
    if backend == "triton" and not runs:
        raise ValueError(
            "sinkhorn backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run its "
            f"kernels on the CPU) and Triton; got a cost on {cost.device}"
        )
    if host_checks is None:  # never on "meta" tensors, which have no values to read
        on_gpu = cost.device.type == "cuda"
        host_checks = cost.device.type != "meta" and not (on_gpu and (fused or mode == "authors"))
    if host_checks and not bool(torch.isfinite(cost).all()):
        bad = int((~torch.isfinite(cost)).sum())
        raise ValueError(
            f"sinkhorn: the cost has {bad} NaN or infinite entries of {cost.numel()} (the "
            "features are not finite: a diverged model or a bad input?)"
        )
    with torch.no_grad(), autocast_off(cost.device):
        cost = cost.detach().float()
        if fused:
            plan, iterations, error = sinkhorn_triton.fused_sinkhorn(
                cost, eps, max_iter, mode, tol, check_every
            )
            return SinkhornResult(plan, iterations, error)
        if mode == "authors":
            plan, iterations = _authors(cost, eps, max_iter, check_every, host_checks)
        else:
            plan, iterations = _converged(cost, eps, max_iter, tol, check_every, host_checks)
        return SinkhornResult(plan, iterations, _marginal_error(plan))


def _sample_errors(plan: Tensor) -> Tensor:
    """(B,): each sample's largest deviation of r·(row sums) and s·(column sums) from 1."""
    rows = (plan.sum(-1) * plan.shape[1] - 1).abs().amax(-1)
    cols = (plan.sum(-2) * plan.shape[2] - 1).abs().amax(-1)
    return torch.maximum(rows, cols)


def _marginal_error(plan: Tensor) -> Tensor:
    """Largest deviation of r·(row sums) and s·(column sums) from 1 over the batch."""
    return _sample_errors(plan).amax()


def _logsumexp_(x: Tensor, dim: int) -> Tensor:
    """torch.logsumexp(x, dim), overwriting x, with shifted terms clamped at _EXP_FLOOR.

    On CPU, torch's vectorised exp takes a path tens of times slower for inputs below about
    −87 (where float32 exp underflows); the authors' raw costs put most terms there. A term
    of exp(−87) ≈ 1.6e-38 next to the maximum's exp(0) = 1 does not change a float32 sum,
    so the result is torch.logsumexp's, bit for bit (tested). Working in place saves an
    allocation per step, which halves the CPU time of a Sinkhorn iteration.
    """
    peak = x.amax(dim, keepdim=True)
    total = x.sub_(peak).clamp_min_(_EXP_FLOOR).exp_().sum(dim)
    return total.log_().add_(peak.squeeze(dim))


def _authors(
    cost: Tensor, eps: float, max_iter: int, check_every: int, host_checks: bool
) -> tuple[Tensor, int | Tensor]:
    """The authors' iteration and exit rule: with `host_checks`, one host sync per chunk of
    iterations; without, none (the exit is selected on the device)."""
    batch, r, s = cost.shape
    ones_r = torch.full((batch, r), 1.0 / r, device=cost.device)
    ones_s = torch.full((batch, s), 1.0 / s, device=cost.device)
    log_mu = torch.log(ones_r + AUTHORS_LOG_OFFSET)
    log_nu = torch.log(ones_s + AUTHORS_LOG_OFFSET)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    neg_cost = -cost
    work = torch.empty_like(cost)

    def lse(u: Tensor, v: Tensor, dim: int) -> Tensor:
        # logsumexp over `dim` of (−C + u_i + v_j) / eps, in the authors' order of operations
        torch.add(neg_cost, u[:, :, None], out=work).add_(v[:, None, :]).div_(eps)
        return _logsumexp_(work, dim)

    def step(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One of their iterations: new u, new v, and their error Σ|u − u_prev| (batch mean)."""
        u_new = eps * (log_mu - lse(u, v, -1)) + u
        v_new = eps * (log_nu - lse(u_new, v, -2)) + v
        return u_new, v_new, (u_new - u).abs().sum(-1).mean()

    if not host_checks:
        done = torch.zeros((), dtype=torch.bool, device=cost.device)
        iterations = torch.zeros((), dtype=torch.int64, device=cost.device)
        for _ in range(max_iter):
            u_new, v_new, err = step(u, v)
            iterations += (~done).long()
            u, v = torch.where(done, u, u_new), torch.where(done, v, v_new)  # frozen once met
            done |= err < AUTHORS_THRESHOLD
        return torch.exp((neg_cost + u[:, :, None] + v[:, None, :]) / eps), iterations

    done = 0
    while done < max_iter:
        steps = min(check_every, max_iter - done)
        errs = torch.empty(steps, device=cost.device)
        history: list[tuple[Tensor, Tensor]] = []
        for k in range(steps):
            u, v, errs[k] = step(u, v)
            history.append((u, v))
        met = (errs < AUTHORS_THRESHOLD).tolist()  # the chunk's one host sync
        if True in met:
            first = met.index(True)
            u, v = history[first]
            done += first + 1
            break
        done += steps
    return torch.exp((neg_cost + u[:, :, None] + v[:, None, :]) / eps), done


def _converged(
    cost: Tensor, eps: float, max_iter: int, tol: float, check_every: int, host_checks: bool
) -> tuple[Tensor, int | Tensor]:
    """Sinkhorn on the mean-normalised cost until each sample's marginals are within `tol`:
    a sample's potentials freeze at the first check its plan meets it; with `host_checks` the
    loop ends when all have (one host sync per check), without it all `max_iter` iterations
    are queued."""
    batch, r, s = cost.shape
    scale = cost.mean(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    log_k = cost / (scale * -eps)  # log of the Gibbs kernel
    f = torch.zeros(cost.shape[:2], device=cost.device)  # row potential / eps
    g = torch.zeros(cost.shape[0], s, device=cost.device)  # column potential / eps
    log_r, log_s = -math.log(r), -math.log(s)
    work = torch.empty_like(cost)
    met = torch.zeros(batch, 1, dtype=torch.bool, device=cost.device)  # per sample
    iterations = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    done = 0
    while done < max_iter:
        f_new, g_new = f, g
        for _ in range(min(check_every, max_iter - done)):
            f_new = log_r - _logsumexp_(torch.add(log_k, g_new[:, None, :], out=work), -1)
            g_new = log_s - _logsumexp_(torch.add(log_k, f_new[:, :, None], out=work), -2)
        chunk = min(check_every, max_iter - done)
        done += chunk
        iterations += (~met[:, 0]).long() * chunk
        f, g = torch.where(met, f, f_new), torch.where(met, g, g_new)  # stopped samples stay
        plan = torch.exp(log_k + f[:, :, None] + g[:, None, :])
        met |= (_sample_errors(plan) < tol)[:, None]
        if host_checks and bool(met.all()):  # the check's one host sync
            return plan, int(iterations.max())
    if not host_checks:
        return plan, iterations.amax()
    warnings.warn(
        f"sinkhorn(mode='converged') stopped at max_iter={max_iter} with marginal error "
        f"{float(_sample_errors(plan).max()):.2e} >= tol={tol:.0e}; raise max_iter or eps",
        RuntimeWarning,
        stacklevel=3,
    )
    return plan, done
