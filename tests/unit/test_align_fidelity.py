"""AlignMix end to end against references that share no code with pipeline.mixing
(tests/authors_reference.py): POT's plan for the converged mode, a float64 run of the authors'
algorithm for theirs, and the float64 direct sum for the cost; on last-stage features of an
untrained ResNet-50 in train mode (c = 2048, 7 × 7, pairwise costs ≈ 1,500, as in training)."""

from __future__ import annotations

import pytest
import torch

from pipeline.mixing import SinkhornOptions, align_mix, squared_cost
from pipeline.models import MixNet
from tests.authors_reference import (
    aligned_mix,
    authors_assignment,
    authors_cost,
    positions,
    pot_assignment,
)
from tests.photos import photo_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAM = 0.3  # not ½, so that λ and 1 − λ swapped would show


@pytest.fixture(scope="module")
def train_features() -> tuple[torch.Tensor, torch.Tensor]:
    """A (4, 2048, 7, 7) of four photo crops and its partners A' = A[π]."""
    torch.manual_seed(0)
    model = MixNet("resnet50", 10).train()  # train mode: batch statistics, costs ≈ 1,500
    with torch.no_grad():
        a = model.features(photo_batch(4))
    return a, a[torch.tensor([1, 2, 3, 0])]


def relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference).norm() / reference.norm()).item()


def test_squared_cost_against_the_float64_direct_sum(train_features):
    a, a_partner = train_features
    expected = authors_cost(positions(a).double(), positions(a_partner).double())
    assert 1000 < expected.mean().item() < 2500  # the magnitude of training, not of eval mode
    cost = squared_cost(positions(a), positions(a_partner))
    assert cost.dtype == torch.float32
    # ‖a‖² + ‖b‖² − 2a·b in float32 over 2,048 channels: a few ulps of ‖a‖² + ‖b‖² (≈ 2,000).
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("direction", [0, 1])
def test_converged_align_mix_against_pots_plan(train_features, direction):
    a, a_partner = train_features
    expected = aligned_mix(a, a_partner, pot_assignment(a, a_partner), LAM, direction)
    out = align_mix(a, a_partner, LAM, direction, SinkhornOptions(mode="converged", tol=1e-4))
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * scale)
    # At the default tolerance (marginals within 1e-3) the mix is within 1e-3 of it overall.
    assert (
        relative(
            align_mix(a, a_partner, LAM, direction, SinkhornOptions(mode="converged")), expected
        )
        < 1e-3
    )


@pytest.mark.parametrize("direction", [0, 1])
def test_authors_align_mix_as_close_to_float64_as_their_own_float32_code(train_features, direction):
    a, a_partner = train_features
    exact = aligned_mix(
        a, a_partner, authors_assignment(a, a_partner, torch.float64), LAM, direction
    )
    theirs = aligned_mix(
        a, a_partner, authors_assignment(a, a_partner, torch.float32), LAM, direction
    )
    ours = align_mix(a, a_partner, LAM, direction, SinkhornOptions(mode="authors"))
    their_error = relative(theirs, exact)
    assert 0 < their_error < 1e-3  # float32 rounding, not a different algorithm
    assert relative(ours, exact) <= 2 * their_error


def test_average_pooling_sees_only_the_marginals_of_the_assignment(train_features):
    # Pooled, eq. 11 is (1/r) Σ_j a'_j · (column sum j of R) and eq. 12 weighs each a_i by row
    # sum i. A converged plan has every sum 1, so for a pool-then-linear classifier both equal
    # plain mixing of A and A'. The authors' loop ends on a column update: their columns sum to
    # 1 as well and only their rows stray (0.14 to 10 here), so only eq. 12 differs from plain.
    a, a_partner = train_features
    pooled, pooled_partner = a.double().mean((2, 3)), a_partner.double().mean((2, 3))
    plain = LAM * pooled + (1 - LAM) * pooled_partner
    for direction in (0, 1):
        converged = align_mix(
            a, a_partner, LAM, direction, SinkhornOptions(mode="converged", tol=1e-5)
        )
        torch.testing.assert_close(converged.double().mean((2, 3)), plain, rtol=1e-4, atol=1e-5)
    eq11 = align_mix(a, a_partner, LAM, 0, SinkhornOptions(mode="authors")).double().mean((2, 3))
    torch.testing.assert_close(eq11, plain, rtol=1e-3, atol=1e-4)
    rows = authors_assignment(a, a_partner, torch.float64).sum(-1)  # (B, r)
    weighted = (a.double().flatten(2) * rows[:, None, :]).mean(-1)
    eq12 = align_mix(a, a_partner, LAM, 1, SinkhornOptions(mode="authors")).double().mean((2, 3))
    torch.testing.assert_close(
        eq12, LAM * weighted + (1 - LAM) * pooled_partner, rtol=1e-3, atol=1e-4
    )
    assert relative(eq12, plain) > 0.05
