"""sample_mix, mix, input_mixup, cutmix and mixed_cross_entropy against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.mixing import MixSample, cutmix, input_mixup, mix, mixed_cross_entropy, sample_mix

# --- sample_mix ----------------------------------------------------------------------------


def test_sample_mix_draws_a_permutation_and_lambda_in_unit_interval():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sample = sample_mix(10, 2.0, "cpu", generator=gen)
        assert isinstance(sample, MixSample) and isinstance(sample.lam, float)
        assert 0.0 <= sample.lam <= 1.0
        assert sample.perm.dtype == torch.int64
        assert torch.equal(sample.perm.sort().values, torch.arange(10))


def test_sample_mix_is_reproducible_with_a_seeded_generator():
    first = [sample_mix(16, 2.0, "cpu", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert first[0].lam == first[1].lam and torch.equal(first[0].perm, first[1].perm)
    other = sample_mix(16, 2.0, "cpu", torch.Generator().manual_seed(8))
    assert other.lam != first[0].lam


def test_sample_mix_follows_the_global_rng_without_a_generator():
    torch.manual_seed(3)
    first = sample_mix(16, 2.0, "cpu")
    torch.manual_seed(3)
    again = sample_mix(16, 2.0, "cpu")
    assert first.lam == again.lam and torch.equal(first.perm, again.perm)


def test_sample_mix_lambda_has_beta_moments():
    # Beta(α, α): mean 1/2, variance 1 / (4(2α + 1)); α = 2 → 0.05, α = 0.5 → 0.125
    gen = torch.Generator().manual_seed(1)
    for alpha in (2.0, 0.5):
        lams = np.array([sample_mix(2, alpha, "cpu", gen).lam for _ in range(4000)])
        assert abs(lams.mean() - 0.5) < 0.02
        assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_sample_mix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be a number > 0, got 0"):
        sample_mix(4, 0, "cpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        sample_mix(0, 1.0, "cpu")


# --- mix and input mixup -------------------------------------------------------------------


def test_mix_hand_values():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    torch.testing.assert_close(mix(a, b, 0.25), torch.tensor([2.5, 4.25]))
    torch.testing.assert_close(mix(a, b, 1.0), a)
    torch.testing.assert_close(mix(a, b, 0.0), b)


def test_input_mixup_hand_values():
    x = torch.tensor([0.0, 10.0, 20.0]).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    perm = torch.tensor([2, 0, 1])
    out = input_mixup(x, perm, 0.75)
    # sample i mixes with sample perm[i]: 0.75·x_i + 0.25·x_perm[i]
    expected = torch.tensor([5.0, 7.5, 17.5]).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("lam", [1.2, -0.5, float("nan"), "0.5"])
def test_mix_rejects_lambda_outside_unit_interval(lam):
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        mix(torch.zeros(2), torch.zeros(2), lam)


def test_mixing_rejects_bad_shapes_and_perms():
    with pytest.raises(ValueError, match=r"one shape, got \(2,\) and \(3,\)"):
        mix(torch.zeros(2), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="perm must be a 1-D int64 tensor of length 3"):
        input_mixup(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1]), 0.5)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\) batch, got shape \(3, 2, 2\)"):
        cutmix(torch.zeros(3, 2, 2), torch.tensor([0, 1, 2]), 0.5)


# --- CutMix --------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 0.37, 0.8, 1.0])
def test_cutmix_box_area_and_sources(lam):
    np.random.seed(0)  # timm draws the box centre from numpy's global RNG
    batch, height, width = 4, 20, 30
    x = (
        (torch.arange(batch, dtype=torch.float32) + 1)
        .view(batch, 1, 1, 1)
        .expand(batch, 3, height, width)
    )
    perm = torch.tensor([1, 2, 3, 0])
    for _ in range(5):
        mixed, lam_adjusted = cutmix(x, perm, lam)
        inside = mixed != x  # every sample differs from its partner, so the box shows
        assert torch.equal(inside, inside[:1].expand_as(inside))  # one box for the batch
        box = inside[0, 0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if box.any():  # a rectangle: every cell between its extreme rows and columns
            assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert lam_adjusted == pytest.approx(1 - box.sum().item() / (height * width))
        if lam < 1:  # timm: a box of side ≈ √(1−λ) of each side, clipped at the border
            assert box.sum().item() <= math.ceil(height * math.sqrt(1 - lam)) * math.ceil(
                width * math.sqrt(1 - lam)
            )
        torch.testing.assert_close(mixed[:, :, box], x[perm][:, :, box])
        torch.testing.assert_close(mixed[:, :, ~box], x[:, :, ~box])


# --- mixed cross-entropy -------------------------------------------------------------------


def nll_by_hand(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean over the batch of −log softmax at the label, smoothed towards the uniform."""
    logits = logits.double()
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    picked = -log_p[torch.arange(len(labels)), labels]
    uniform = -log_p.mean(-1)
    return ((1 - smoothing) * picked + smoothing * uniform).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_cross_entropy_by_hand(smoothing):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 3, 1, 1, 2])
    perm = torch.tensor([4, 2, 0, 1, 3])
    lam = 0.3
    expected = lam * nll_by_hand(logits, y, smoothing) + (1 - lam) * nll_by_hand(
        logits, y[perm], smoothing
    )
    got = mixed_cross_entropy(logits, y, perm, lam, label_smoothing=smoothing)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_mixed_cross_entropy_rejects_bad_input():
    with pytest.raises(
        ValueError, match=r"logits \(B, classes\) and labels \(B,\), got \(4, 3\) and \(5,\)"
    ):
        mixed_cross_entropy(
            torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), torch.arange(5), 0.5
        )
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\], got 2"):
        mixed_cross_entropy(
            torch.zeros(5, 3), torch.zeros(5, dtype=torch.int64), torch.arange(5), 2
        )
