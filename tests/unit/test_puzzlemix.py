"""PuzzleMix, checked against what is computed here independently: the energy against hand-worked
numbers, the graph cut against brute force over every mask of a 4 × 4 grid, the exact transport
against brute force over permutations and POT's `ot.emd`, the authors' greedy bidding against a
literal loop over their plan matrices, the saliency against an input gradient taken directly,
and the loss against per-sample λ·CE + (1 − λ)·CE rebuilt from the mixed images the model saw.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

import pipeline.methods.puzzlemix as method_module
from pipeline.config import ModelConfig
from pipeline.errors import RecipeError
from pipeline.methods import MethodContext, build_method
from pipeline.mixing import puzzlemix as pm
from pipeline.models import build_model
from pipeline.recipe import load_recipe
from pipeline.training.step import step_generator

B, K = 6, 10


def _method(context: MethodContext | None = None, **settings):
    extra = [f"method.{k}={v}" for k, v in settings.items()]
    return build_method(load_recipe(None, ["method.name=puzzlemix", *extra]).method, context)


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="test_resnet", output_stride=8), K).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(K, (B,), generator=g)


# --- the energy, by hand ----------------------------------------------------------------------

# A 2 × 2 grid of 2-pixel blocks, one channel. x is 0 in its left column of blocks and 1 in its
# right one; the partner is 0.5 everywhere. Block saliencies s (of x) and s' (of the partner).
X = torch.tensor([[0, 0, 1, 1]] * 4, dtype=torch.float64).reshape(1, 1, 4, 4)
PARTNER = torch.full_like(X, 0.5)
S = torch.tensor([[[0.1, 0.4], [0.2, 0.3]]], dtype=torch.float64)
S_PARTNER = torch.full_like(S, 0.25)
# β = 1.6 → β' = 1.6 / (16·2) = 0.05; γ = 0.5 → β'γ = 0.025; η = 0.2 → η/n² = 0.05; λ = 0.3.
HAND = {"beta": 1.6, "gamma": 0.5, "eta": 0.2, "neigh_size": 2}


@pytest.mark.parametrize("neigh_size", [1, 2])  # constant blocks: the cell size changes nothing
def test_energy_of_a_two_label_mask_matches_the_hand_computed_value(neigh_size):
    options = pm.PuzzleOptions(n_labels=2, **{**HAND, "neigh_size": neigh_size})
    terms = pm.puzzle_terms(S, S_PARTNER, X, PARTNER, 0.3, options)
    # z = [[1, 0], [1, 1]]: x everywhere but the top-right block.
    #  saliency covered: 0.25 + 0.4 + 0.25 + 0.25 = 1.15
    #  prior: 0.05·(3·(−log 0.3) + (−log 0.7)) = 0.19842967
    #  label smoothness: 2 pairs differ (top row, right column) → 0.05·2 = 0.1
    #  seams, the pair actually shown across each boundary plus (d01 + d10)/2 = 0.5 each:
    #   left column x|x: |0 − 0| = 0; right column partner over x: |0.5 − 1| = 0.5;
    #   top row x|partner: |0 − 0.5| = 0.5; bottom row x|x: |0 − 1| = 1
    #   → 0.025·(0 + 0.5 + 0.5 + 1 + 4·0.5) = 0.1
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    expected = 1.15 + 0.05 * (3 * -math.log(0.3) - math.log(0.7)) + 0.1 + 0.1
    assert pm.puzzle_energy(mask, terms).item() == pytest.approx(expected, abs=1e-7)
    # all x: saliency 4·0.25 = 1; prior 0.05·4·(−log 0.3); seams 0.025·(0 + 0 + 1 + 1 + 2)
    expected = 1.0 + 0.05 * 4 * -math.log(0.3) + 0.025 * 4
    assert pm.puzzle_energy(torch.ones(1, 2, 2), terms).item() == pytest.approx(expected, abs=1e-7)


def test_energy_of_a_three_label_mask_matches_the_hand_computed_value():
    terms = pm.puzzle_terms(S, S_PARTNER, X, PARTNER, 0.3, pm.PuzzleOptions(n_labels=3, **HAND))
    # z = [[0.5, 0], [1, 1]].
    #  saliency, linear in z: 0.5·0.25 + 0.5·0.1 + 0.4 + 0.25 + 0.25 = 1.075
    #  prior, P = λ², 2λ(1−λ), (1−λ)² = 0.09, 0.42, 0.49: 0.05·(−log .42 − log .49 − 2 log .09)
    #  label smoothness: 0.05·((0.5−1)² + (0−1)² + (0.5−0)² + 0) = 0.075
    #  seams D_uv(z_u, z_v) of the docstring:
    #   left column (d11, d10, d01, d00 = 0, .5, .5, 0), z = .5, 1:
    #     .5·(.5 + 0)/2 + .5·(0 + .5)/2 + 1·(.5 + 0)/2 + 0 + .25·(.5 + .5)/2 = 0.625
    #   right column (same d), z = 0, 1: 0 + .25 + .25 + 0 + 1·1/2 = 1.0
    #   top row (d11, d10, d01, d00 = 1, .5, .5, 0), z = .5, 0:
    #     .5·(.5 + 1)/2 + .5·(0 + .5)/2 + 0 + 1·(0 + .5)/2 + .25·(.5 + .5 − 1)/2 = 0.75
    #   bottom row (same d), z = 1, 1: (.5 + 1)/2 + (.5 + 1)/2 = 1.5
    #   → 0.025·(0.625 + 1 + 0.75 + 1.5) = 0.096875
    mask = torch.tensor([[[0.5, 0.0], [1.0, 1.0]]])
    prior = 0.05 * (-math.log(0.42) - math.log(0.49) - 2 * math.log(0.09))
    expected = 1.075 + prior + 0.075 + 0.096875
    assert pm.puzzle_energy(mask, terms).item() == pytest.approx(expected, abs=1e-7)


def test_the_authors_priors_for_two_three_and_four_labels():
    lam = 0.3
    for n_labels, p in (
        (2, [1 - lam, lam]),
        (3, [(1 - lam) ** 2, 2 * lam * (1 - lam), lam**2]),
        (4, [(1 - lam) ** 3, 3 * lam * (1 - lam) ** 2, 3 * lam**2 * (1 - lam), lam**3]),
    ):
        expected = -np.log(np.array(p) + 1e-8)
        np.testing.assert_allclose(pm.label_prior(lam, n_labels).numpy(), expected, rtol=1e-12)


# --- the graph cut against brute force --------------------------------------------------------


def _pair_of_images(seed: int, lam: float, **params):
    """Terms for 2 smooth 16 px images on a 4 × 4 grid, saliency a blob in opposite corners."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 4, 4, generator=g)
    images = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(2, 3, 16, 16, generator=g)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.stack([torch.exp(-((yy - 3) ** 2 + (xx - 3) ** 2) / 20)] * 2)
    blob[1] = blob[1].flip(0, 1)
    saliency = pm.block_saliency(blob + 0.3 * torch.rand(2, 16, 16, generator=g), 4)
    perm = torch.tensor([1, 0])
    options = pm.PuzzleOptions(n_labels=params.pop("n_labels", 2), **params)
    return pm.puzzle_terms(saliency, saliency[perm], images, images[perm], lam, options)


def _all_binary_masks(n: int) -> torch.Tensor:
    bits = torch.arange(2 ** (n * n))[:, None] >> torch.arange(n * n)
    return (bits & 1).double().reshape(-1, 1, n, n)  # (2^(n²), 1, n, n)


def _tolerance(terms) -> torch.Tensor:
    """What rounding every term to 2⁻²⁰ of the largest can cost, per sample (40 terms, twice)."""
    largest = torch.stack(
        [
            terms.cost_x.flatten(1).amax(1) + terms.cost_partner.flatten(1).amax(1),
            terms.w_v.flatten(1).amax(1),
            terms.w_h.flatten(1).amax(1),
        ]
    ).amax(0)
    return 2 * 40 * 0.5 * (largest + terms.prior.max()) / pm.GRAPHCUT_RESOLUTION


@pytest.mark.parametrize(
    "params",
    [
        {"lam": 0.5, "beta": 1.2, "gamma": 0.5, "eta": 0.2, "neigh_size": 2},  # the authors'
        {"lam": 0.3, "beta": 6.0, "gamma": 3.0, "eta": 0.2, "neigh_size": 2},  # strong seams
        {"lam": 0.7, "beta": 0.0, "gamma": 0.0, "eta": 1.0, "neigh_size": 4},  # no pairs at all
    ],
    ids=["authors", "smooth", "unary_only"],
)
def test_two_label_graph_cut_is_the_brute_force_minimum(params):
    terms = _pair_of_images(0, **params)
    cut = pm.graphcut_mask(terms)
    assert cut.shape == (2, 4, 4) and set(cut.unique().tolist()) <= {0.0, 1.0}
    energies = pm.puzzle_energy(_all_binary_masks(4), terms)  # (65536, 2)
    best, order = energies.sort(0)
    tol = _tolerance(terms)
    e_cut = pm.puzzle_energy(cut, terms)
    assert (e_cut <= best[0] + tol).all(), (e_cut - best[0], tol)
    for b in range(2):
        if best[1, b] - best[0, b] > tol[b]:  # a unique minimum: the cut must be it
            assert torch.equal(cut[b].double(), _all_binary_masks(4)[order[0, b], 0])
    if params["beta"] == 1.2:  # the case is not trivial: each optimum mixes both images
        assert all(0 < cut[b].mean() < 1 for b in range(2)), cut


def test_three_label_graph_cut_is_a_local_minimum():
    """α-β swap is exact for two labels only; with three, no single block may improve."""
    terms = _pair_of_images(1, lam=0.4, beta=1.2, gamma=0.5, eta=0.2, neigh_size=2, n_labels=3)
    cut = pm.graphcut_mask(terms).double()
    assert set(cut.unique().tolist()) <= {0.0, 0.5, 1.0}
    e_cut, tol = pm.puzzle_energy(cut, terms), _tolerance(terms)
    for r, c in itertools.product(range(4), range(4)):
        for value in (0.0, 0.5, 1.0):
            moved = cut.clone()
            moved[:, r, c] = value
            assert (pm.puzzle_energy(moved, terms) >= e_cut - tol).all()
    for value in (0.0, 0.5, 1.0):
        assert (pm.puzzle_energy(torch.full_like(cut, value), terms) >= e_cut - tol).all()


# --- transport --------------------------------------------------------------------------------


def _objective(cost: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Σ_j cost[source_j, j] per sample (a full assignment)."""
    return cost.gather(1, source[:, None, :]).squeeze(1).sum(1)


def test_exact_transport_is_the_brute_force_and_pot_optimum():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    source = pm.exact_assignment(small)
    for b in range(5):
        values = {
            perm: sum(small[b, perm[j], j].item() for j in range(4))
            for perm in itertools.permutations(range(4))
        }
        best = min(values, key=values.get)
        assert source[b].tolist() == list(best)
    # 4 × 4 grids with the transport cost of real masks: the same optimum as POT's exact LP
    saliency = pm.block_saliency(torch.rand(3, 8, 8, generator=g), 4)
    keep = torch.rand(3, 4, 4, generator=g) > 0.5
    cost = pm.transport_cost(saliency, keep, t_eps=0.05).double()
    source = pm.exact_assignment(cost)
    assert all(sorted(s.tolist()) == list(range(16)) for s in source)  # permutations
    uniform = np.full(16, 1 / 16)
    for b in range(3):
        plan = ot.emd(uniform, uniform, cost[b].numpy())
        assert _objective(cost[b : b + 1], source[b : b + 1]).item() == pytest.approx(
            16 * float((plan * cost[b].numpy()).sum()), abs=1e-9
        )


def _authors_rounds_literally(cost: np.ndarray, rounds: int) -> list[int]:
    """The authors' `mask_transport` for one sample, written as plain loops over their plan
    matrix: rows bid for their row minimum; per column, the first row index whose entry of
    `plan * cost` is the column minimum wins if it really bid there; losers' entries + 1."""
    cost = cost.astype(np.float64).copy()
    n = cost.shape[0]
    for _ in range(rounds):
        plan = np.zeros_like(cost)
        for i in range(n):
            plan[i, int(np.argmin(cost[i]))] = 1.0
        fight = plan * cost
        win = np.zeros_like(cost)
        for j in range(n):
            i = int(np.argmin(fight[:, j]))
            win[i, j] = plan[i, j]
        cost += (1.0 - win) * plan
    return [int(np.argmax(win[:, j])) if win[:, j].any() else -1 for j in range(n)]


def test_the_authors_greedy_transport_matches_their_rounds_written_as_loops():
    g = torch.Generator().manual_seed(3)
    cases = [torch.randn(4, 9, 9, generator=g) * 0.3]  # random costs, many conflicts
    for m, t_eps in ((4, 0.8), (4, 0.05), (3, 0.0)):  # transport costs of masks and saliency
        saliency = pm.block_saliency(torch.rand(4, m * 2, m * 2, generator=g) ** 4, m)
        keep = torch.rand(4, m, m, generator=g) > 0.4
        cases.append(pm.transport_cost(saliency, keep, t_eps))  # exact zeros on the diagonal
    ties = torch.zeros(2, 4, 4)
    ties[0, 2] = torch.tensor([0.0, 1.0, 1.0, 1.0])
    cases.append(ties)  # all-zero and tied costs: the first-index rules decide
    for cost in cases:
        rounds = math.isqrt(cost.shape[1])
        got = pm.greedy_assignment(cost, rounds)
        for b in range(cost.shape[0]):
            assert got[b].tolist() == _authors_rounds_literally(cost[b].numpy(), rounds)
        used = [s for s in got.flatten().tolist() if s >= 0]
        assert len(used) == len(set(used)) or cost.shape[0] > 1  # injective per sample
        for row in got:
            kept = [s for s in row.tolist() if s >= 0]
            assert len(kept) == len(set(kept))


def test_greedy_without_conflicts_is_the_optimum():
    """When every source's cheapest destination is its own and negative, one round settles
    it, and that is optimal (every row gets its own minimum): the same as `ot.emd`."""
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(2, 9, 9, generator=g)
    target = torch.stack([torch.randperm(9, generator=g) for _ in range(2)])
    cost.scatter_(2, target[..., None], -1.0)
    got = pm.greedy_assignment(cost, rounds=3)
    for b in range(2):
        plan = ot.emd(np.full(9, 1 / 9), np.full(9, 1 / 9), cost[b].double().numpy())
        assert got[b].tolist() == (plan.argmax(0)).tolist()  # source of each destination


def test_moving_blocks_puts_each_source_block_where_the_map_says():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 12, 12, generator=g)
    source = torch.stack([torch.randperm(9, generator=g) for _ in range(2)])
    source[1, 4] = -1
    moved = pm.move_blocks(images, source, 3)
    for b, j in itertools.product(range(2), range(9)):
        rj, cj = divmod(j, 3)
        block = moved[b, :, 4 * rj : 4 * rj + 4, 4 * cj : 4 * cj + 4]
        i = source[b, j].item()
        if i < 0:
            assert (block == 0).all()
        else:
            ri, ci = divmod(i, 3)
            assert torch.equal(block, images[b, :, 4 * ri : 4 * ri + 4, 4 * ci : 4 * ci + 4])


@pytest.mark.parametrize("solver", ["authors", "exact"])
def test_transport_moves_a_salient_block_next_door_into_the_kept_region(solver):
    images = torch.zeros(1, 3, 8, 8)
    images[0, :, 0:4, 0:4] = 1.0  # the salient block, top-left
    saliency = torch.tensor([[[0.7, 0.1], [0.1, 0.1]]])
    keep = torch.tensor([[[False, True], [False, False]]])  # only the top-right block is shown
    out = pm.transport(images, saliency, keep, t_eps=0.1, solver=solver)
    assert (out[0, :, 0:4, 4:8] == 1).all()  # moved one block right, where the mask keeps it


# --- saliency, loss, draws --------------------------------------------------------------------


def test_saliency_is_the_input_gradient_norm_and_leaves_parameters_and_bn_alone():
    model, (x, y) = _model().train(), _batch()
    method = _method()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running = [m.running_mean.clone() for m in norms]
    saliency, _ = method.saliency(model, x, y)
    assert model.training  # back in the mode it came in
    assert all(p.grad is None for p in model.parameters())
    assert norms and all(
        torch.equal(m.running_mean, r) for m, r in zip(norms, running, strict=True)
    )
    model.eval()  # each image's own loss gradient, one image at a time (eval: no coupling)
    for b in range(B):
        leaf = x[b : b + 1].clone().requires_grad_(True)
        F.cross_entropy(model(leaf), y[b : b + 1]).backward()
        torch.testing.assert_close(saliency[b], leaf.grad[0].pow(2).sum(0).sqrt())
    # block pooling, by loops: the mean of each block over the image's sum of block means
    pooled = pm.block_saliency(saliency, 4)
    means = torch.tensor(
        [[[saliency[b, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].mean() for c in range(4)]
          for r in range(4)] for b in range(B)]
    )  # fmt: skip
    torch.testing.assert_close(pooled, means / means.sum((1, 2), keepdim=True))


@pytest.fixture
def recorded(monkeypatch):
    """What the method drew (λ, π), and the (mixed images, per-sample λ, mask) of its
    `mix_by_mask`, from the real functions."""
    seen = {"draws": [], "mixes": []}
    real_sample, real_mix = method_module.sample_mix, method_module.mix_by_mask

    def sample(*args, **kwargs):
        seen["draws"].append(real_sample(*args, **kwargs))
        return seen["draws"][-1]

    def mix(images, partner, mask):
        mixed, lam = real_mix(images, partner, mask)
        seen["mixes"].append((mixed, lam, mask))
        return mixed, lam

    monkeypatch.setattr(method_module, "sample_mix", sample)
    monkeypatch.setattr(method_module, "mix_by_mask", mix)
    return seen


@pytest.mark.parametrize("clean_lam", [0.0, 1.5])
def test_loss_is_per_sample_lambda_weighted_cross_entropy_plus_the_clean_term(recorded, clean_lam):
    model, (x, y) = _model(), _batch()
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    out = _method(clean_lam=clean_lam)(model, x, y, step_generator(0, 1))
    (s,), ((mixed, lam, mask),) = recorded["draws"], recorded["mixes"]
    assert len(inputs) == 2 and torch.equal(inputs[0], x) and torch.equal(inputs[1], mixed)
    torch.testing.assert_close(lam, mask.mean((1, 2)))
    assert mask.shape[-1] == out.stats["grid"].item()
    with torch.no_grad():
        logits = model(mixed)
        per_sample = [
            lam[b] * F.cross_entropy(logits[b : b + 1], y[b : b + 1])
            + (1 - lam[b]) * F.cross_entropy(logits[b : b + 1], y[s.perm[b]].reshape(1))
            for b in range(B)
        ]
        expected = torch.stack(per_sample).mean() + clean_lam * F.cross_entropy(model(x), y)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, logits)
    assert out.stats["lam"].item() == pytest.approx(lam.mean().item())
    assert out.stats["lam_prior"].item() == pytest.approx(s.lam)
    assert out.loss.requires_grad


def test_without_transport_each_block_comes_whole_from_one_image(recorded):
    model, (x, y) = _model(), _batch()
    for step in range(4):
        _method(transport="false", n_labels=2)(model, x, y, step_generator(0, step))
    for s, (mixed, _, mask) in zip(recorded["draws"], recorded["mixes"], strict=True):
        size = 32 // mask.shape[-1]
        for b, r, c in itertools.product(range(B), range(mask.shape[-1]), range(mask.shape[-1])):
            pick = x[b] if mask[b, r, c] == 1 else x[s.perm[b]]
            rows, cols = slice(r * size, r * size + size), slice(c * size, c * size + size)
            assert torch.equal(mixed[b, :, rows, cols], pick[:, rows, cols])


def test_the_same_seed_and_step_give_the_same_output_whatever_the_global_rngs():
    model, (x, y) = _model(), _batch()
    method = _method()
    outs = []
    for seed in (10, 20):
        torch.manual_seed(seed)
        np.random.seed(seed)
        outs.append(method(model, x, y, step_generator(0, 5)))
    a, b = outs
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)
    assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)
    other = [method(model, x, y, step_generator(0, step)) for step in (6, 7, 8)]
    assert any(not torch.equal(o.loss, a.loss) for o in other)


def test_the_settings_reach_the_mixing_functions_as_one_options_value():
    method = _method(
        MethodContext(std=(0.5, 0.25, 0.125)),  # the data's std, which the run passes on
        n_labels=2, beta=0.5, gamma=1.0, eta=0.3, neigh_size=4, t_eps=0.3, t_size=4,
        transport_solver="exact",
    )  # fmt: skip
    assert method.options == pm.PuzzleOptions(
        n_labels=2, beta=0.5, gamma=1.0, eta=0.3, neigh_size=4, pixel_std=(0.5, 0.25, 0.125),
        t_eps=0.3, t_size=4, solver="exact",
    )  # fmt: skip
    # the method's defaults (the authors' ImageNet recipe) are the functions' own
    assert _method().options == pm.PuzzleOptions(pixel_std=(0.229, 0.224, 0.225))


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.n_labels=1", r"method\.n_labels"),
        ("method.block_nums=[4,1]", r"method\.block_nums\.1"),
        ("method.block_nums=[]", r"method\.block_nums"),
        ("method.transport_solver=hungarian", r"method\.transport_solver"),
        ("method.t_size=0", r"method\.t_size"),
        ("method.pixel_std=[0.2,0.2,0.2]", r"unknown key 'method\.pixel_std'"),  # data.std
        ("method.beta=-1", r"method\.beta"),
        ("method.sinkhorn=authors", r"unknown key 'method\.sinkhorn'"),
    ],
)
def test_bad_settings_are_errors_that_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe(None, ["method.name=puzzlemix", override])


def test_bad_inputs_are_value_errors_saying_what_was_expected():
    model, (x, y) = _model(), _batch()
    with pytest.raises(ValueError, match="divides the image side 30"):
        _method(block_nums="[4]")(model, x[..., :30, :30], y, step_generator(0, 0))
    with pytest.raises(ValueError, match="pixel_std must hold 3"):
        _method(MethodContext(std=(0.2,)))(model, x, y, step_generator(0, 0))
    terms = pm.puzzle_terms(S, S_PARTNER, X, PARTNER, 0.3, pm.PuzzleOptions(n_labels=2, **HAND))
    with pytest.raises(ValueError, match=r"mask values must be among"):
        pm.puzzle_energy(torch.full((1, 2, 2), 0.5), terms)
    with pytest.raises(ValueError, match=r"square 4-D"):
        pm.boundary_distances(torch.zeros(1, 3, 4, 6), torch.zeros(1, 3, 4, 6), 2, 1)
    with pytest.raises(ValueError, match=r"square matrices"):
        pm.greedy_assignment(torch.zeros(1, 3, 4), 2)
    with pytest.raises(ValueError, match=r"solver must be"):
        pm.transport(torch.zeros(1, 3, 4, 4), torch.ones(1, 2, 2), torch.ones(1, 2, 2) > 0, 1, "x")
