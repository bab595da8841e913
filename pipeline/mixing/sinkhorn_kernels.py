"""Triton kernels of the fused Sinkhorn solver (`sinkhorn_triton.py` launches them).

One program per sample holds its r × s cost tile in registers for every iteration. The helpers
follow the eager solver's order of operations (`sinkhorn.py`): potentials in the log domain,
terms of each logsumexp floored at e^-87, masked lanes excluded. Importing this module needs
Triton; with TRITON_INTERPRET=1 set before Triton is imported, the kernels run in Triton's
interpreter on CPU tensors (how the tests check them without a GPU).
"""

import triton
import triton.language as tl


@triton.jit
def _lse_rows(x, mask, row_mask):
    # logsumexp over the columns of x (masked entries excluded), terms floored at e^-87
    peak = tl.where(row_mask, tl.max(tl.where(mask, x, float("-inf")), axis=1), 0.0)
    terms = tl.where(mask, tl.exp(tl.maximum(x - peak[:, None], -87.0)), 0.0)
    return tl.log(tl.sum(terms, axis=1)) + peak


@triton.jit
def _lse_cols(x, mask, col_mask):
    peak = tl.where(col_mask, tl.max(tl.where(mask, x, float("-inf")), axis=0), 0.0)
    terms = tl.where(mask, tl.exp(tl.maximum(x - peak[None, :], -87.0)), 0.0)
    return tl.log(tl.sum(terms, axis=0)) + peak


@triton.jit
def _authors_step(neg_c, u, v, mask, row_mask, col_mask, eps, log_mu, log_nu):
    # one of the authors' iterations: u from (u, v), then v from (u_new, v)
    lse = _lse_rows((neg_c + u[:, None] + v[None, :]) / eps, mask, row_mask)
    u_new = tl.where(row_mask, eps * (log_mu - lse) + u, 0.0)
    lse = _lse_cols((neg_c + u_new[:, None] + v[None, :]) / eps, mask, col_mask)
    v_new = tl.where(col_mask, eps * (log_nu - lse) + v, 0.0)
    return u_new, v_new, tl.sum(tl.abs(u_new - u), axis=0)


@triton.jit
def _load(cost_ptr, b, r, s, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    rows, cols = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_S)
    row_mask, col_mask = rows < r, cols < s
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = b.to(tl.int64) * r * s + rows[:, None] * s + cols[None, :]
    return tl.load(cost_ptr + offsets, mask=mask, other=0.0), offsets, mask, row_mask, col_mask


@triton.jit
def _marginal_error(plan, mask, r, s):
    # max |r·row sum − 1|, |s·column sum − 1| over the valid rows and columns
    plan = tl.where(mask, plan, 0.0)
    rows = tl.where(tl.arange(0, plan.shape[0]) < r, tl.abs(tl.sum(plan, 1) * r - 1.0), 0.0)
    cols = tl.where(tl.arange(0, plan.shape[1]) < s, tl.abs(tl.sum(plan, 0) * s - 1.0), 0.0)
    return tl.maximum(tl.max(rows, 0), tl.max(cols, 0), propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["max_iter"])
def authors_trace(
    cost_ptr, err_ptr, batch, r, s, eps, log_mu, log_nu, max_iter,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c, _, mask, row_mask, col_mask = _load(cost_ptr, b, r, s, BLOCK_R, BLOCK_S)
    neg_c = -c
    u = tl.zeros([BLOCK_R], tl.float32)
    v = tl.zeros([BLOCK_S], tl.float32)
    for t in range(0, max_iter):
        u, v, err = _authors_step(neg_c, u, v, mask, row_mask, col_mask, eps, log_mu, log_nu)
        tl.store(err_ptr + t * batch + b, err)


@triton.jit(do_not_specialize=["max_iter"])
def authors_plan(
    cost_ptr, err_ptr, plan_ptr, stat_ptr, iter_ptr, batch, r, s, eps, log_mu, log_nu,
    max_iter, threshold,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    # the authors' exit: the first iteration whose batch mean of Σ|u − u_prev| < 0.1
    last = max_iter - 1
    for t in range(0, max_iter):
        total = 0.0
        for b0 in range(0, batch, BLOCK_B):
            lanes = b0 + tl.arange(0, BLOCK_B)
            errs = tl.load(err_ptr + t * batch + lanes, mask=lanes < batch, other=0.0)
            total += tl.sum(errs, axis=0)
        met = total / batch < threshold
        last = tl.where(met & (t < last), t, last)
    c, offsets, mask, row_mask, col_mask = _load(cost_ptr, b, r, s, BLOCK_R, BLOCK_S)
    neg_c = -c
    u = tl.zeros([BLOCK_R], tl.float32)
    v = tl.zeros([BLOCK_S], tl.float32)
    for _t in range(0, last + 1):
        u, v, _err = _authors_step(neg_c, u, v, mask, row_mask, col_mask, eps, log_mu, log_nu)
    plan = tl.exp((neg_c + u[:, None] + v[None, :]) / eps)
    tl.store(plan_ptr + offsets, plan, mask=mask)
    tl.store(stat_ptr + b, _marginal_error(plan, mask, r, s))
    tl.store(iter_ptr + b, last + 1)


@triton.jit(do_not_specialize=["max_iter", "check_every"])
def converged_plan(
    cost_ptr, plan_ptr, stat_ptr, iter_ptr, r, s, eps, log_r, log_s, max_iter, tol,
    check_every, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c, offsets, mask, row_mask, col_mask = _load(cost_ptr, b, r, s, BLOCK_R, BLOCK_S)
    scale = tl.maximum(tl.sum(tl.sum(c, axis=1), axis=0) / (r * s), 1.1754943508222875e-38)
    log_k = c / (scale * -eps)
    f = tl.zeros([BLOCK_R], tl.float32)
    g = tl.zeros([BLOCK_S], tl.float32)
    done = max_iter * 0
    stop = max_iter + 0
    while done < stop:
        steps = tl.minimum(check_every, max_iter - done)
        for _t in range(0, steps):
            f = tl.where(row_mask, log_r - _lse_rows(log_k + g[None, :], mask, row_mask), 0.0)
            g = tl.where(col_mask, log_s - _lse_cols(log_k + f[:, None], mask, col_mask), 0.0)
        done += steps
        # this sample stops at the first check its plan meets (the loop ends with done = stop)
        error = _marginal_error(tl.exp(log_k + f[:, None] + g[None, :]), mask, r, s)
        stop = tl.where(error < tol, done, stop)
    plan = tl.exp(log_k + f[:, None] + g[None, :])
    tl.store(plan_ptr + offsets, plan, mask=mask)
    tl.store(stat_ptr + b, _marginal_error(plan, mask, r, s))
    tl.store(iter_ptr + b, done)


@triton.jit
def reduce(stat_ptr, iter_ptr, error_ptr, iterations_ptr, batch, BLOCK_B: tl.constexpr):
    # the batch's largest marginal error (NaN if any) and iteration count
    worst = 0.0
    most = 0
    for b0 in range(0, batch, BLOCK_B):
        lanes = b0 + tl.arange(0, BLOCK_B)
        errs = tl.load(stat_ptr + lanes, mask=lanes < batch, other=0.0)
        worst = tl.maximum(worst, tl.max(errs, 0), propagate_nan=tl.PropagateNan.ALL)
        counts = tl.load(iter_ptr + lanes, mask=lanes < batch, other=0)
        most = tl.maximum(most, tl.max(counts, 0))
    tl.store(error_ptr, worst)
    tl.store(iterations_ptr, most.to(tl.int64))
