"""squared_cost and sinkhorn against POT, the authors' loop, and real ResNet-50 features."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import timm
import torch

from pipeline.mixing import SinkhornOptions, SinkhornResult, sinkhorn, squared_cost
from tests.authors_reference import authors_sinkhorn
from tests.photos import photo_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cost(scale: float) -> torch.Tensor:
    """A (4, 9, 9) squared-distance cost of random points, times `scale`."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 9, 5, generator=gen), torch.rand(4, 9, 5, generator=gen)
    return ((a[:, :, None] - b[:, None]) ** 2).sum(-1) * scale


def row_col_error(plan: torch.Tensor) -> float:
    """max |r·row sum − 1|, |s·column sum − 1| computed from the plan, in float64."""
    plan = plan.double()
    rows = (plan.sum(-1) * plan.shape[1] - 1).abs().max()
    cols = (plan.sum(-2) * plan.shape[2] - 1).abs().max()
    return max(rows.item(), cols.item())


# --- squared_cost -------------------------------------------------------------------------


def test_squared_cost_matches_broadcast_definition():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 3
    b = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 3
    expected = ((a[:, :, None, :] - b[:, None, :, :]) ** 2).sum(-1)
    got = squared_cost(a.float(), b.float())
    assert got.dtype == torch.float32 and got.shape == (3, 5, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_squared_cost_is_float32_and_nonnegative_under_autocast():
    a = torch.rand(2, 6, 32) * 100
    b = a.flip(1).clone()  # rows meet their twins: costs of exactly 0 must not go negative
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = squared_cost(a, b)
    assert got.dtype == torch.float32
    assert (got >= 0).all()
    torch.testing.assert_close(got, squared_cost(a, b))
    expected = ((a.double()[:, :, None] - b.double()[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.5)


def test_squared_cost_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expects a \(B, r, c\) and b \(B, s, c\)"):
        squared_cost(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"got \(3, 4\)"):
        squared_cost(torch.zeros(3, 4), torch.zeros(2, 3, 4))


# --- converged mode against POT ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 5, 8)])
def test_converged_mode_matches_pot(shape):
    gen = torch.Generator().manual_seed(2)
    batch, r, s = shape
    a = torch.randn(batch, r, 4, generator=gen)
    b = torch.randn(batch, s, 4, generator=gen)
    cost = squared_cost(a, b) * 50  # magnitude must not matter: eps is relative to the mean
    result = sinkhorn(cost, SinkhornOptions(eps=0.1, mode="converged", tol=1e-6, max_iter=5000))
    assert isinstance(result, SinkhornResult)
    assert result.plan.shape == shape and result.plan.dtype == torch.float32
    for i in range(batch):
        m = cost[i].double().numpy()
        expected = ot.sinkhorn(
            np.full(r, 1.0 / r),
            np.full(s, 1.0 / s),
            m / m.mean(),
            0.1,
            method="sinkhorn_log",
            numItermax=100_000,
            stopThr=1e-12,
        )
        np.testing.assert_allclose(result.plan[i].double().numpy(), expected, rtol=0, atol=1e-5)
        # entries are ~1/(r s): also close relative to their size
        np.testing.assert_allclose(result.plan[i].double().numpy(), expected, rtol=1e-3, atol=1e-9)


def test_converged_mode_warns_when_max_iter_runs_out():
    cost = small_cost(1.0)
    with pytest.warns(RuntimeWarning, match="max_iter=2"):
        result = sinkhorn(cost, SinkhornOptions(mode="converged", eps=0.01, max_iter=2, tol=1e-7))
    assert result.iterations == 2


def test_sinkhorn_is_detached_float32_under_autocast():
    cost = small_cost(3.0).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = sinkhorn(cost, SinkhornOptions(mode="converged"))
    assert result.plan.dtype == torch.float32 and not result.plan.requires_grad
    torch.testing.assert_close(
        result.plan, sinkhorn(cost.detach(), SinkhornOptions(mode="converged")).plan
    )


# --- authors' mode: their iteration and stopping rule --------------------------------------


HOST_CHECKS = pytest.mark.parametrize("host_checks", [True, False], ids=["host", "device"])


@HOST_CHECKS
@pytest.mark.parametrize("check_every", [1, 7, 10, 100])
def test_authors_mode_exits_mid_chunk_like_their_loop(check_every, host_checks):
    cost = small_cost(10.6)  # constructed so that their loop stops at iteration 23
    expected_plan, expected_iterations = authors_sinkhorn(cost)
    assert expected_iterations == 23
    result = sinkhorn(
        cost, SinkhornOptions(mode="authors", check_every=check_every, host_checks=host_checks)
    )
    assert int(result.iterations) == 23
    torch.testing.assert_close(result.plan, expected_plan, rtol=1e-6, atol=0)


@HOST_CHECKS
def test_authors_mode_runs_all_iterations_when_rule_is_never_met(host_checks):
    cost = small_cost(1000.0)  # large raw costs against eps = 0.1: their rule never fires
    expected_plan, expected_iterations = authors_sinkhorn(cost)
    assert expected_iterations == 100
    result = sinkhorn(cost, SinkhornOptions(mode="authors", host_checks=host_checks))
    assert int(result.iterations) == 100
    torch.testing.assert_close(result.plan, expected_plan, rtol=1e-6, atol=0)
    capped = sinkhorn(
        cost, SinkhornOptions(mode="authors", max_iter=25, check_every=10, host_checks=host_checks)
    )
    assert int(capped.iterations) == 25
    torch.testing.assert_close(
        capped.plan, authors_sinkhorn(cost, max_iter=25)[0], rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("mode", ["authors", "converged"])
@pytest.mark.parametrize("scale", [1.0, 10.6, 1000.0])
def test_device_side_exit_gives_the_host_checked_plan_bit_for_bit(mode, scale):
    # No host sync: every iteration is queued and the potentials freeze on the device where
    # the rule is first met. Same plan, same iteration count, as the loop that stops there.
    cost = small_cost(scale)
    host = sinkhorn(cost, SinkhornOptions(mode=mode, host_checks=True, max_iter=300))
    device = sinkhorn(cost, SinkhornOptions(mode=mode, host_checks=False, max_iter=300))
    assert isinstance(device.iterations, torch.Tensor) and device.iterations.dim() == 0
    assert int(device.iterations) == host.iterations
    assert torch.equal(device.plan, host.plan)


def test_sinkhorn_rejects_bad_arguments():
    cost = small_cost(1.0)
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'exact'"):
        sinkhorn(cost, SinkhornOptions(mode="exact"))
    with pytest.raises(ValueError, match=r"\(B, r, s\) cost, got shape \(9, 9\)"):
        sinkhorn(cost[0])
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        sinkhorn(cost, SinkhornOptions(eps=0))
    with pytest.raises(ValueError, match="max_iter and check_every must be >= 1"):
        sinkhorn(cost, SinkhornOptions(max_iter=0))


# --- real ResNet-50 features (untrained, real photos) --------------------------------------


@pytest.fixture(scope="module")
def resnet50_costs() -> dict[str, torch.Tensor]:
    """Costs between last-stage ResNet-50 features of 8 photo crops and their rolled partners."""
    torch.manual_seed(0)
    images = photo_batch(8)
    model = timm.create_model("resnet50", pretrained=False)
    costs = {}
    for name, train in (("train", True), ("eval", False)):
        model.train(train)
        with torch.no_grad():
            feats = model.forward_features(images).flatten(2).transpose(1, 2)  # (8, 49, 2048)
        costs[name] = squared_cost(feats, feats.roll(1, 0))
    return costs


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_converged_mode_marginals_on_resnet50_features(resnet50_costs, phase):
    cost = resnet50_costs[phase]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "max_iter ran out" warning
        result = sinkhorn(cost, SinkhornOptions(mode="converged"))
    assert result.iterations < 1000
    assert row_col_error(result.plan) < 1e-3
    assert result.marginal_error.item() < 1e-3


def test_authors_mode_on_train_features_keeps_its_skewed_rows(resnet50_costs):
    # docs/mixing.md: costs ≈ 1,500 against eps = 0.1; all 100 iterations run, rows stray far.
    cost = resnet50_costs["train"]
    assert 500 < cost.mean().item() < 5000
    result = sinkhorn(cost, SinkhornOptions(mode="authors"))
    assert result.iterations == 100
    assert row_col_error(result.plan) > 0.5
    torch.testing.assert_close(result.plan, authors_sinkhorn(cost)[0], rtol=1e-5, atol=0)
    assert torch.equal(
        sinkhorn(cost, SinkhornOptions(mode="authors", host_checks=False)).plan, result.plan
    )
