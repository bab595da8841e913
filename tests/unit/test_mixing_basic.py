"""sample_mix, mix, input_mixup, cutmix and mixed_cross_entropy against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.mixing import (
    MixSample,
    cutmix,
    cutmix_box,
    input_mixup,
    mix,
    mixed_cross_entropy,
    sample_mix,
)

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
    batch, height, width = 4, 20, 30
    x = (
        (torch.arange(batch, dtype=torch.float32) + 1)
        .view(batch, 1, 1, 1)
        .expand(batch, 3, height, width)
    )
    perm = torch.tensor([1, 2, 3, 0])
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        mixed, lam_adjusted = cutmix(x, perm, lam, generator=rng)
        inside = mixed != x  # every sample differs from its partner, so the box shows
        assert torch.equal(inside, inside[:1].expand_as(inside))  # one box for the batch
        box = inside[0, 0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if box.any():  # a rectangle: every cell between its extreme rows and columns
            assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert lam_adjusted == pytest.approx(1 - box.sum().item() / (height * width))
        # at most 2·(cut // 2) pixels a side, cut = int(side · √(1−λ)), clipped at the border
        cut_h, cut_w = (int(side * math.sqrt(1 - lam)) for side in (height, width))
        assert len(rows) <= 2 * (cut_h // 2) and len(cols) <= 2 * (cut_w // 2)
        torch.testing.assert_close(mixed[:, :, box], x[perm][:, :, box])
        torch.testing.assert_close(mixed[:, :, ~box], x[:, :, ~box])


def authors_rand_bbox(size, lam, first_draw, second_draw):
    """clovaai/CutMix-PyTorch's `rand_bbox`, re-derived, with its two `np.random.randint` draws
    given: they name dim 2 `W` and dim 3 `H`, draw `cx` on dim 2 first, then `cy` on dim 3, and
    paste `x[:, :, bbx1:bbx2, bby1:bby2]`."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = first_draw, second_draw
    bbx1, bbx2 = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    bby1, bby2 = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    return int(bbx1), int(bbx2), int(bby1), int(bby2)


@pytest.mark.parametrize("size", [(32, 32), (31, 20), (7, 224)])
def test_cutmix_box_is_the_cutmix_authors(size):
    """Every (λ, centre): the same box as the authors' code, centre drawn uniformly per axis."""
    height, width = size
    rng = torch.Generator().manual_seed(1)
    centres = set()
    for lam in np.linspace(0.0, 1.0, 41):
        for _ in range(25):
            # The two draws cutmix_box makes, read from a copy of the generator's state.
            twin = torch.Generator().set_state(rng.get_state())
            first = int(torch.randint(height, (1,), generator=twin))
            second = int(torch.randint(width, (1,), generator=twin))
            centres.add((first, second))
            assert cutmix_box(height, width, float(lam), rng) == authors_rand_bbox(
                (1, 3, height, width), lam, first, second
            )
    assert len(centres) > 0.5 * min(41 * 25, height * width)  # centres spread over the image


def test_cutmix_mean_lambda_is_the_authors_at_32px():
    """Averaged over λ ~ U(0, 1) (CutMix's Beta(1, 1)) and every centre, the corrected λ equals
    the authors'; timm's box (one pixel more on odd cuts) gives 0.011 less."""
    size, lams = 32, np.linspace(0.005, 0.995, 100)

    def mean_lam(box) -> float:
        areas = [
            (y1 - y0) * (x1 - x0)
            for lam in lams
            for cy in range(size)
            for cx in range(size)
            for (y0, y1, x0, x1) in [box(lam, cy, cx)]
        ]
        return 1 - float(np.mean(areas)) / size**2

    def timm_box(lam, cy, cx):  # timm's rand_bbox: the far side gets (cut + 1) // 2
        cut = int(size * np.sqrt(1 - lam))
        low, high = cut // 2, (cut + 1) // 2
        return max(cy - low, 0), min(cy + high, size), max(cx - low, 0), min(cx + high, size)

    authors = mean_lam(lambda lam, cy, cx: authors_rand_bbox((1, 3, size, size), lam, cy, cx))
    timm_like = mean_lam(timm_box)
    rng = torch.Generator().manual_seed(0)
    ours = []
    for lam in lams:
        for _ in range(200):
            y0, y1, x0, x1 = cutmix_box(size, size, float(lam), rng)
            ours.append(1 - (y1 - y0) * (x1 - x0) / size**2)
    assert np.mean(ours) == pytest.approx(authors, abs=2e-3)  # 20,000 random centres
    assert authors - timm_like == pytest.approx(0.011, abs=1e-3)


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
