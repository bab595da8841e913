"""align / align_features / align_mix: hand-worked alignment, gradients, autocast, bad input."""

from __future__ import annotations

import pytest
import torch

from pipeline.mixing import SinkhornOptions, align, align_features, align_mix

MODES = ["authors", "converged"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def permuted_pair(batch: int = 2, c: int = 64, h: int = 3, w: int = 3):
    """Features A with well-separated positions and A' = A with positions permuted by σ."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, c, h, w, generator=gen) * 5
    sigma = torch.randperm(h * w, generator=gen)
    a_partner = a.flatten(2)[:, :, sigma].reshape(batch, c, h, w)  # a'_j = a_σ(j)
    return a, a_partner, sigma


# Converged mode gets eps = 0.05 (relative): off-match entries of the plan are then
# ≈ exp(−1/0.05) ≈ 2e-9 of the match, so R is a permutation to ~1e-7.
@pytest.mark.parametrize(("mode", "eps"), [("authors", 0.1), ("converged", 0.05)])
def test_alignment_recovers_a_spatial_permutation(mode, eps):
    a, a_partner, sigma = permuted_pair()
    r = sigma.numel()
    assignment = align(a, a_partner, SinkhornOptions(mode=mode, eps=eps))
    assert assignment.shape == (2, r, r) and assignment.dtype == torch.float32
    # m_ij = 0 exactly where a_i = a'_j, i.e. j = σ⁻¹(i)
    inverse = torch.argsort(sigma)
    assert torch.equal(assignment.argmax(-1), inverse.expand(2, r))
    one_hot = torch.zeros(r, r)
    one_hot[torch.arange(r), inverse] = 1.0
    torch.testing.assert_close(assignment, one_hot.expand(2, r, r), rtol=0, atol=1e-5)

    a_tilde = align_features(
        a, a_partner, 0, SinkhornOptions(mode=mode, eps=eps)
    )  # A'Rᵀ: A' in A's geometry
    torch.testing.assert_close(a_tilde, a, rtol=0, atol=1e-3)
    a_partner_tilde = align_features(a, a_partner, 1, SinkhornOptions(mode=mode, eps=eps))  # AR
    torch.testing.assert_close(a_partner_tilde, a_partner, rtol=0, atol=1e-3)
    # so the aligned mix of A with its own permutation is A (eq. 11) or A' (eq. 12), any λ
    for lam in (0.0, 0.3, 1.0):
        out0 = align_mix(a, a_partner, lam, 0, SinkhornOptions(mode=mode, eps=eps))
        torch.testing.assert_close(out0, a, rtol=0, atol=1e-3)
        out1 = align_mix(a, a_partner, lam, 1, SinkhornOptions(mode=mode, eps=eps))
        torch.testing.assert_close(out1, a_partner, rtol=0, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", [0, 1])
def test_align_mix_matches_equations_11_and_12(mode, direction):
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 16, 2, 3, generator=gen) * 4
    a_partner = torch.rand(3, 16, 2, 3, generator=gen) * 4
    lam = 0.35
    R = align(a, a_partner, SinkhornOptions(mode=mode)).double()
    A, Ap = a.flatten(2).double(), a_partner.flatten(2).double()  # (B, c, r)
    if direction == 0:
        expected = lam * A + (1 - lam) * Ap @ R.transpose(1, 2)
    else:
        expected = lam * A @ R + (1 - lam) * Ap
    out = align_mix(a, a_partner, lam, direction, SinkhornOptions(mode=mode))
    assert out.shape == a.shape and out.dtype == a.dtype
    torch.testing.assert_close(out.double(), expected.view(a.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", [0, 1])
def test_gradients_reach_both_inputs_but_not_through_the_plan(direction):
    gen = torch.Generator().manual_seed(4)
    a = (torch.rand(2, 8, 3, 3, generator=gen) * 3).requires_grad_()
    a_partner = (torch.rand(2, 8, 3, 3, generator=gen) * 3).requires_grad_()
    upstream = torch.randn(2, 8, 3, 3, generator=gen)
    lam = 0.4
    R = align(a, a_partner, SinkhornOptions(mode="converged"))
    assert not R.requires_grad
    (
        align_mix(a, a_partner, lam, direction, SinkhornOptions(mode="converged")) * upstream
    ).sum().backward()
    G = upstream.flatten(2)
    if direction == 0:  # out = λA + (1−λ)A'Rᵀ with R held fixed
        grad_a, grad_partner = lam * G, (1 - lam) * G @ R
    else:  # out = λAR + (1−λ)A'
        grad_a, grad_partner = lam * G @ R.transpose(1, 2), (1 - lam) * G
    torch.testing.assert_close(a.grad.flatten(2), grad_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_partner.grad.flatten(2), grad_partner, rtol=1e-5, atol=1e-6)


def test_gradients_with_partner_taken_from_the_same_batch():
    feats = torch.rand(4, 8, 2, 2).requires_grad_()
    perm = torch.tensor([2, 0, 3, 1])
    out = align_mix(feats, feats[perm], 0.5, 0)
    out.sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


# Under autocast the alignment matmul runs in the low dtype; R is the float32 plan in both
# runs. Each product R_ij·a'_j carries at most two input roundings and the sum one output
# rounding, unit roundoff u: |out − out_fp32| ≤ 3u(1−λ)·(|A'|Rᵀ) elementwise (direction 0).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dtype", "unit_roundoff"), [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)]
)
def test_autocast_output_is_finite_and_close_to_float32(mode, dtype, unit_roundoff):
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(2, 512, 4, 4, generator=gen) * 100  # costs ≈ 8.5e5
    a_partner = torch.rand(2, 512, 4, 4, generator=gen) * 100
    lam = 0.3
    reference = align_mix(a, a_partner, lam, 0, SinkhornOptions(mode=mode))
    R = align(a, a_partner, SinkhornOptions(mode=mode))
    with torch.autocast("cpu", dtype=dtype):
        out = align_mix(a, a_partner, lam, 0, SinkhornOptions(mode=mode))
        out_low = align_mix(a.to(dtype), a_partner.to(dtype), lam, 1, SinkhornOptions(mode=mode))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out_low.dtype == dtype and torch.isfinite(out_low).all()
    bound = 3 * unit_roundoff * (1 - lam) * (a_partner.flatten(2) @ R.transpose(1, 2))
    assert ((out - reference).abs().flatten(2) <= bound + 1e-6).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"a": torch.zeros(2, 4, 9)},
            r"expects 4-D \(B, c, h, w\) feature tensors, got shapes \(2, 4, 9\)",
        ),
        (
            {"a_partner": torch.zeros(2, 4, 3, 2)},
            r"same shape, got \(2, 4, 3, 3\) and \(2, 4, 3, 2\)",
        ),
        ({"a_partner": torch.zeros(2, 4, 3, 3, dtype=torch.float64)}, "same dtype and device"),
        ({"lam": 1.5}, r"lam must be a number in \[0, 1\], got 1.5"),
        ({"lam": -0.1}, r"lam must be a number in \[0, 1\], got -0.1"),
        ({"lam": float("nan")}, r"lam must be a number in \[0, 1\], got nan"),
        ({"lam": "0.5"}, r"lam must be a number in \[0, 1\], got '0.5'"),
        ({"direction": 2}, r"direction must be 0 \(eq. 11\) or 1 \(eq. 12\), got 2"),
        ({"direction": True}, r"direction must be 0 \(eq. 11\) or 1 \(eq. 12\), got True"),
        (
            {"options": SinkhornOptions(mode="exact")},
            r"mode must be one of \('authors', 'converged'\), got 'exact'",
        ),
        ({"options": SinkhornOptions(eps=-1.0)}, "eps must be > 0, got -1.0"),
    ],
)
def test_align_mix_rejects_bad_input(kwargs, message):
    args = {
        "a": torch.zeros(2, 4, 3, 3),
        "a_partner": torch.zeros(2, 4, 3, 3),
        "lam": 0.5,
        "direction": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        align_mix(**args)
