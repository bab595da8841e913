"""The fused Triton Sinkhorn (pipeline/mixing/sinkhorn_triton.py) without a GPU: Triton's
interpreter (TRITON_INTERPRET=1) runs its kernels on CPU tensors in a process of their own
(tests/triton_interpreter.py), and each result is checked here against the eager solver (itself
tested against POT and the authors' loop) and the authors' loop re-derived in
tests/authors_reference.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.mixing import SinkhornOptions, sinkhorn
from tests.authors_reference import authors_sinkhorn
from tests.triton_interpreter import SHAPES, random_cost

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
MODES = ("authors", "converged")


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict:
    """name → (cost, options, plan, iterations, marginal error) from the interpreted kernels."""
    out = tmp_path_factory.mktemp("triton") / "fused.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    ran = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.triton_interpreter", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return torch.load(out)


def check_case(fused: dict, name: str):
    """The fused result of case `name` against the eager solver's (no host syncs, so that both
    count iterations on the device); returns the eager result."""
    cost, options, plan, iterations, error = fused[name]
    eager = sinkhorn(cost, SinkhornOptions(backend="eager", host_checks=False, **options))
    assert isinstance(iterations, torch.Tensor) and iterations.dim() == 0
    assert int(iterations) == int(eager.iterations), name
    assert plan.shape == eager.plan.shape and plan.dtype == torch.float32
    scale = eager.plan.abs().max()
    torch.testing.assert_close(plan, eager.plan, rtol=1e-5, atol=1e-5 * scale, msg=name)
    torch.testing.assert_close(error, eager.marginal_error, rtol=1e-4, atol=1e-6, msg=name)
    return eager


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_fused_solver_matches_the_eager_one(fused, mode, shape):
    """r, s ∈ {1, 4, 16, 49, 64}, non-square, B = 1: the same plan and iteration count."""
    check_case(fused, f"{mode}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", ["0.5", "10.6", "1000"])
def test_fused_solver_across_cost_scales(fused, mode, scale):
    """Costs on which the authors' rule fires at once, mid-run, and never."""
    eager = check_case(fused, f"{mode}-scale{scale}")
    if mode == "authors" and scale == "1000":
        assert int(eager.iterations) == 40  # all of max_iter


@pytest.mark.parametrize("phase", ["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_solver_on_real_resnet_costs(fused, phase, mode):
    """Last-stage ResNet-18 features of real photos, 7 × 7 = 49 positions."""
    eager = check_case(fused, f"{mode}-resnet-{phase}")
    if mode == "authors" and phase == "train":
        assert int(eager.iterations) == 100  # raw train-mode costs: the rule never fires


def test_authors_exit_at_its_threshold(fused):
    """Their loop re-derived stops this cost at iteration 23; capped at 20 it returns the last."""
    cost, _, plan, iterations, _ = fused["authors-23"]
    expected_plan, expected_iterations = authors_sinkhorn(cost)
    assert expected_iterations == 23 and int(iterations) == 23
    torch.testing.assert_close(plan, expected_plan, rtol=1e-5, atol=0)
    cost, _, plan, iterations, _ = fused["authors-23-capped"]
    assert int(iterations) == 20
    torch.testing.assert_close(plan, authors_sinkhorn(cost, max_iter=20)[0], rtol=1e-5, atol=0)


def test_converged_samples_stop_on_their_own_error(fused):
    """An easy sample and a hard one: each plan is that of the sample solved alone (the easy
    one stopped at its own check), and the batch's count is the most any sample ran."""
    cost, options, plan, iterations, _ = fused["converged-easy-hard"]
    alone = [
        sinkhorn(cost[i : i + 1], SinkhornOptions(backend="eager", **options)) for i in range(2)
    ]
    assert alone[0].iterations < alone[1].iterations
    assert int(iterations) == alone[1].iterations
    for i, result in enumerate(alone):
        torch.testing.assert_close(plan[i], result.plan[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_costs_raise_the_eager_solvers_error(bad, monkeypatch):
    """The check comes before either backend runs (where host checks are allowed)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that "triton" takes CPU tensors
    cost = random_cost(2, 4, 4, 1.0)
    cost[1, 2, 3] = bad
    for backend in ("eager", "triton"):
        with pytest.raises(ValueError, match="1 NaN or infinite entries of 32"):
            sinkhorn(cost, SinkhornOptions(backend=backend))


def test_larger_maps_fall_back_to_the_eager_solver(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cost = random_cost(2, 65, 30, 3.0)
    fused = sinkhorn(cost, SinkhornOptions(mode="authors", backend="triton"))
    eager = sinkhorn(cost, SinkhornOptions(mode="authors", backend="eager"))
    assert isinstance(fused.iterations, int)  # the eager loop's host-checked count
    assert fused.iterations == eager.iterations and torch.equal(fused.plan, eager.plan)


def test_triton_on_the_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' needs CUDA tensors"):
        sinkhorn(random_cost(1, 4, 4, 1.0), SinkhornOptions(backend="triton"))
    # "auto" on the CPU is the eager loop
    assert isinstance(sinkhorn(random_cost(1, 4, 4, 1.0)).iterations, int)
