"""Each method's loss is λ·CE(y) + (1−λ)·CE(y[π]) of logits we rebuild independently; CutMix's
box comes from the step's generator alone; the AE decoder learns on clean batches only and the
classifier never sees a decoded image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AEConfig, ModelConfig
from pipeline.methods import build_method
from pipeline.mixing import input_mixup, mix
from pipeline.models import build_model
from pipeline.recipe import load_recipe
from tests.authors_reference import aligned_mix, authors_assignment, pot_assignment

B, K = 8, 10


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randperm(K, generator=g)[:B]


def _model(autoencoder=False):
    torch.manual_seed(0)
    ae = AEConfig(embed_channels=16, decoder_width=16, decoder_min_width=8, decoder_blocks=1)
    cfg = ModelConfig(name="test_resnet", output_stride=8, ae=ae)
    return build_model(cfg, K, autoencoder=autoencoder).eval()  # eval: BN is deterministic


def _method(name, **settings):
    extra = [f"method.{k}={v}" for k, v in settings.items()]
    return build_method(load_recipe(None, [f"method.name={name}", *extra]).method)


def _recorder(calls: list):
    """A forward pre-hook that keeps each call's first input."""
    return lambda module, inputs: calls.append(inputs[0])


def _model_input(model):
    """The images the model's first stage sees, recorded on every call."""
    seen = []
    model.stages[0].register_forward_pre_hook(_recorder(seen))
    return seen


def _mixed_ce(logits, y, perm, lam):
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])


def test_baseline_is_plain_cross_entropy():
    model, (x, y) = _model(), _batch()
    out = _method("baseline")(model, x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))


def test_input_mixup_loss(recorded):
    model, (x, y) = _model(), _batch()
    out = _method("input_mixup")(model, x, y, torch.Generator().manual_seed(3))
    s = recorded[-1]
    assert 0 < s.lam < 1 and sorted(s.perm.tolist()) == list(range(B))
    expected = model(s.lam * x + (1 - s.lam) * x[s.perm])
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, _mixed_ce(expected, y, s.perm, s.lam))


def test_cutmix_loss_uses_the_area_corrected_lambda(recorded):
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    out = _method("cutmix")(model, x, y, torch.Generator().manual_seed(4))
    s, mixed = recorded[-1], seen[-1]
    lam = float(out.stats["lam"])
    pasted = (mixed != x).any(dim=(0, 1))  # random images: the pasted box differs everywhere
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one box
    torch.testing.assert_close(mixed[:, :, pasted], x[s.perm][:, :, pasted])
    torch.testing.assert_close(mixed[:, :, ~pasted], x[:, :, ~pasted])
    assert lam == pytest.approx(1 - pasted.float().mean().item(), abs=1e-6)
    torch.testing.assert_close(out.logits, model(mixed))
    torch.testing.assert_close(out.loss, _mixed_ce(model(mixed), y, s.perm, lam))


def test_cutmix_box_comes_from_the_step_generator_alone():
    """The same generator seed pastes the same box whatever the global RNGs hold; another seed
    moves it (timm's box, used before, read numpy's global RNG)."""
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    cutmix = _method("cutmix")
    boxes = []
    for seed, global_seed in ((4, 0), (4, 123), (5, 0)):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        cutmix(model, x, y, torch.Generator().manual_seed(seed))
        boxes.append((seen[-1] != x).any(dim=(0, 1)))
    assert torch.equal(boxes[0], boxes[1])
    assert not torch.equal(boxes[0], boxes[2])


def test_manifold_mixup_mixes_at_one_of_the_levels(recorded):
    model, (x, y) = _model(), _batch()
    out = _method("manifold_mixup", levels="[1,2]")(model, x, y, torch.Generator().manual_seed(5))
    s = recorded[-1]
    level = int(out.stats["level"])
    assert level in (1, 2)
    h = model.forward_levels(x, 0, level)
    expected = model.head(model.forward_levels(mix(h, h[s.perm], s.lam), level, 4))
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.loss, _mixed_ce(expected, y, s.perm, s.lam))


def _reference_assignment(a, a_partner, mode):
    """R from a reference that shares no code with pipeline.mixing (tests/authors_reference.py):
    the authors' algorithm in float64, or POT's converged plan."""
    if mode == "authors":
        return authors_assignment(a, a_partner, torch.float64)
    return pot_assignment(a, a_partner)


def _aligned_candidates(a, s, mode):
    """Eq. 11 and eq. 12 mixes of A and A[π] from the reference plan, in float32."""
    R = _reference_assignment(a, a[s.perm], mode)
    return {f"eq{11 + d}": aligned_mix(a, a[s.perm], R, s.lam, d).float() for d in (0, 1)}


# The converged solver runs to marginals within 1e-4 here, so it matches POT's plan to ~1e-5.
SOLVERS = {"authors": [], "converged": ["method.sinkhorn=converged", "method.sinkhorn_tol=1e-4"]}


def _close(x, y) -> bool:
    return torch.allclose(x, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


@pytest.mark.parametrize("mode", list(SOLVERS))
def test_alignmixup_is_input_mixup_or_aligned_mixing(recorded, mode):
    model, (x, y) = _model(), _batch()
    method = build_method(load_recipe(None, ["method.name=alignmixup", *SOLVERS[mode]]).method)
    kinds = set()
    for seed in range(12):
        out = method(model, x, y, torch.Generator().manual_seed(seed))
        s = recorded[-1]
        a = model.features(x)
        matches = ["input"] if _close(out.logits, model(input_mixup(x, s.perm, s.lam))) else []
        if not matches:  # the reference plan only when needed: POT takes a while
            aligned = _aligned_candidates(a, s, mode)
            matches = [k for k, v in aligned.items() if _close(out.logits, model.head(v))]
        if mode == "converged" and matches == ["eq11", "eq12"]:
            # Average pooling is blind to a doubly stochastic R (docs/mixing.md): both
            # directions give the logits of λ·pool(A) + (1 − λ)·pool(A').
            matches = ["aligned"]
        assert len(matches) == 1, (seed, matches)
        kinds.add(matches[0])
        torch.testing.assert_close(out.loss, _mixed_ce(out.logits, y, s.perm, s.lam))
        assert float(out.stats["aligned"]) == (matches[0] != "input")
    # both halves of the schedule, and both directions where the logits tell them apart
    assert kinds == ({"input", "eq11", "eq12"} if mode == "authors" else {"input", "aligned"})


@pytest.mark.parametrize("mode", list(SOLVERS))
def test_alignmixup_ae_mixes_at_x_aligned_a_or_e(recorded, mode):
    model, (x, y) = _model(autoencoder=True), _batch()
    recipe = load_recipe(None, ["method.name=alignmixup_ae", "method.clean_prob=0", *SOLVERS[mode]])
    method = build_method(recipe.method)
    kinds = set()
    for seed in range(16):
        out = method(model, x, y, torch.Generator().manual_seed(seed))
        s = recorded[-1]
        a = model.features(x)
        e = model.embed(a)
        candidates = {
            "x": model.head(model.features(input_mixup(x, s.perm, s.lam))),
            "e": model.classify(mix(e, e[s.perm], s.lam)),
        }
        matches = [k for k, v in candidates.items() if _close(out.logits, v)]
        if not matches:
            aligned = _aligned_candidates(a, s, mode)
            matches = [k for k, v in aligned.items() if _close(out.logits, model.head(v))]
        assert len(matches) == 1, (seed, matches)
        kinds.add(matches[0])
        torch.testing.assert_close(out.loss, _mixed_ce(out.logits, y, s.perm, s.lam))
    assert kinds == {"x", "e", "eq11", "eq12"}  # f's ReLU tells the directions apart


def _decoder_grads(model):
    return [p.grad for p in model.decoder.parameters()]


def test_ae_decoder_learns_on_clean_batches_only():
    x, y = _batch()
    method = _method("alignmixup_ae")
    seen = set()
    for seed in range(16):
        model = _model(autoencoder=True)
        encoder_calls, classifier_inputs = [], []
        model.stages[0].register_forward_pre_hook(_recorder(encoder_calls))
        model.classifier.register_forward_pre_hook(_recorder(classifier_inputs))
        out = method(model, x, y, torch.Generator().manual_seed(seed))
        out.loss.backward()
        # The encoder ran once, on the (possibly mixed) images, never on a decoded image, and
        # the classifier read one pooled embedding.
        assert len(encoder_calls) == 1 and len(classifier_inputs) == 1
        clean = bool(out.stats["clean"])
        if clean:
            torch.testing.assert_close(encoder_calls[0], x)
        seen.add(clean)
        grads = _decoder_grads(model)
        if clean:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
            e = model.embed(model.features(x))
            recon = F.mse_loss(model.decode(e), x)
            expected = F.cross_entropy(model.classify(e), y) + recon
            torch.testing.assert_close(out.loss, expected)
        else:
            assert all(g is None for g in grads)
    assert seen == {True, False}


def test_alignmixup_or_cutmix_uses_both():
    model, (x, y) = _model(), _batch()
    method = _method("alignmixup_or_cutmix")
    used = {
        ("aligned" in method(model, x, y, torch.Generator().manual_seed(s)).stats)
        for s in range(10)
    }
    assert used == {True, False}
