"""The paper's ablation switches (Table 6) as settings: unaligned mixing of A is eq. 2 exactly and
aligned mixing is not; e and E mix the extra layer f's output as stated; the VAE's KL term is the
closed form, its samples have the stated spread, and with σ → 0 it is the AE; every recipe of
recipes/cifar100_ablation/ loads, and bad combinations are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pipeline.config import AEConfig, ModelConfig
from pipeline.errors import RecipeError
from pipeline.methods import build_method
from pipeline.methods.alignmixup_ae import gaussian_kl
from pipeline.recipe import load_recipe
from tests.authors_reference import aligned_mix, authors_assignment

REPO = Path(__file__).resolve().parents[2]
ABLATIONS = sorted((REPO / "recipes" / "cifar100_ablation").glob("[!_]*.yaml"))
B, K = 8, 10


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randperm(K, generator=g)[:B]


def _setup(method: str, *overrides: str, ae: dict | None = None):
    """(method, model in eval mode) from `method.<key>=<value>` overrides and model.ae keys:
    test_resnet at output stride 8, so A is (B, 64, 4, 4) at 32 px."""
    settings = load_recipe(None, [f"method.name={method}", *overrides]).method
    m = build_method(settings)
    cfg = dict(embed_channels=16, decoder_width=16, decoder_min_width=8, decoder_blocks=1)
    cfg.update(ae or {})
    torch.manual_seed(0)
    model = m.build_model(ModelConfig(name="test_resnet", output_stride=8, ae=AEConfig(**cfg)), K)
    return m, model.eval()


def _eq2(t, s):
    """Eq. 2 written out: λ·t + (1 − λ)·t[π]."""
    return s.lam * t + (1 - s.lam) * t[s.perm]


def test_unaligned_a_is_eq2_exactly_and_aligned_is_not(recorded):
    x, y = _batch()
    unaligned, model = _setup("alignmixup", "method.mix_levels=[A]", "method.align=false")
    for seed in range(3):
        out = unaligned(model, x, y, torch.Generator().manual_seed(seed))
        s = recorded[-1]
        expected = model.head(_eq2(model.features(x), s))
        torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
        assert float(out.stats["aligned"]) == 0.0
    # The pooled classifier is blind to a column-stochastic R (docs/mixing.md), so the aligned
    # mix is told apart behind f's ReLU: the AE's classifier reads f(mixed A).
    for align in ("false", "true"):
        m, ae = _setup(
            "alignmixup_ae", "method.mix_levels=[A]", "method.clean_prob=0", f"method.align={align}"
        )
        out = m(ae, x, y, torch.Generator().manual_seed(0))
        s = recorded[-1]
        a = ae.features(x)
        eq2 = ae.classify(ae.embed(_eq2(a, s)))
        if align == "false":
            torch.testing.assert_close(out.logits, eq2, rtol=1e-6, atol=1e-6)
            continue
        # aligned: eq. 11 or 12 of the authors' plan (re-derived in tests/authors_reference.py)
        plan = authors_assignment(a, a[s.perm], torch.float64)
        eqs = [
            ae.classify(ae.embed(aligned_mix(a, a[s.perm], plan, s.lam, d).float())) for d in (0, 1)
        ]
        gaps = [(out.logits - v).abs().max().item() for v in eqs]
        assert min(gaps) < 1e-5 < (out.logits - eq2).abs().max().item() / 10, gaps


def test_align_pool_mixes_the_pooled_a(recorded):
    x, y = _batch()
    m, model = _setup(
        "alignmixup", "method.mix_levels=[A]", "method.align=false", "method.align_pool=2"
    )
    out = m(model, x, y, torch.Generator().manual_seed(0))
    pooled = F.avg_pool2d(model.features(x), 2)  # 4 × 4 → 2 × 2 by hand
    torch.testing.assert_close(out.logits, model.head(_eq2(pooled, recorded[-1])))


@pytest.mark.parametrize("kind", ["vector", "tensor"])
def test_e_and_E_mix_the_output_of_f(recorded, kind):
    """Vector e (FC on the flattened A, R^16) mixes plainly; tensor E (2×2 conv, stride 2, a
    2 × 2 grid) mixes as eq. 2 when unaligned. AlignMixup gets f but no decoder."""
    x, y = _batch()
    level = "e" if kind == "vector" else "E"
    m, model = _setup(
        "alignmixup",
        f"method.mix_levels=[{level}]",
        "method.align=false",
        ae={"embedding": kind, "grid": 4},
    )
    assert model.decoder is None and not model.has_decoder
    a = model.features(x)
    if kind == "vector":  # f by hand: linear on the flattened A, BatchNorm (eval), ReLU
        f = model.embedding
        bn = f.post[0]
        z = a.flatten(1) @ f.linear.weight.T
        e = F.relu(
            (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        )[:, :, None, None]
    else:
        e = model.embed(a)
        assert e.shape == (B, 16, 2, 2)
    torch.testing.assert_close(model.embed(a), e, rtol=1e-5, atol=1e-5)
    out = m(model, x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        out.logits, model.classify(_eq2(e, recorded[-1])), rtol=1e-5, atol=1e-5
    )


def test_the_kl_term_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(4, 6, 2, 2, generator=g), torch.randn(4, 6, 2, 2, generator=g)
    reference = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(gaussian_kl(mu, log_var), reference)
    assert gaussian_kl(torch.zeros(3), torch.zeros(3)).item() == 0.0  # N(0, 1) itself


def _vae_and_ae(log_var_bias: float, *overrides: str):
    """A VAE whose log σ² is the constant `log_var_bias`, and an AE with the same weights."""
    vae_m, vae = _setup("alignmixup_ae", *overrides, ae={"variational": True})
    ae_m, ae = _setup("alignmixup_ae", *overrides)
    with torch.no_grad():
        vae.log_var.weight.zero_()
        vae.log_var.bias.fill_(log_var_bias)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("log_var.")}
    ae.load_state_dict(state)
    return vae_m, vae, ae_m, ae


def test_vae_samples_e_around_mu_with_sigma():
    """e = μ + σ·ε: the classifier's pooled input moves from pooled μ by σ/√(h·w) on average."""
    sigma = 0.5
    m, vae, _, _ = _vae_and_ae(2 * torch.log(torch.tensor(sigma)).item(), "method.clean_prob=1")
    x, y = _batch()
    pooled = []
    vae.classifier.register_forward_pre_hook(lambda mod, inp: pooled.append(inp[0]))
    m(vae, x, y, torch.Generator().manual_seed(0))
    mu = vae.embed(vae.features(x)).mean(dim=(2, 3))
    spread = (pooled[-1] - mu).std().item()
    assert spread == pytest.approx(sigma / 4, rel=0.2)  # 4 × 4 grid: 16 positions pooled


@pytest.mark.parametrize("clean", [True, False])
def test_the_vae_with_sigma_to_zero_is_the_ae(clean):
    overrides = ["method.kl_weight=0", f"method.clean_prob={1 if clean else 0}"]
    vae_m, vae, ae_m, ae = _vae_and_ae(-200.0, *overrides)  # σ = e^-100
    x, y = _batch()
    for seed in range(4):
        out_vae = vae_m(vae, x, y, torch.Generator().manual_seed(seed))
        out_ae = ae_m(ae, x, y, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out_vae.logits, out_ae.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_vae.loss, out_ae.loss, rtol=1e-6, atol=1e-6)
        assert ("kl" in out_vae.stats) == clean


def test_the_clean_vae_loss_adds_the_weighted_kl():
    x, y = _batch()
    m, vae, ae_m, ae = _vae_and_ae(-200.0, "method.clean_prob=1", "method.kl_weight=0.5")
    out = m(vae, x, y, torch.Generator().manual_seed(0))
    mu = vae.embed(vae.features(x))
    kl = 0.5 * (mu.square() - 1.0 + 200.0).mean()  # log σ² = −200 everywhere, σ² ≈ 0
    without = ae_m(ae, x, y, torch.Generator().manual_seed(0)).loss
    torch.testing.assert_close(out.loss, without + 0.5 * kl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_row_is_a_recipe(path):
    recipe = load_recipe(path)
    assert recipe.name == f"cifar100_ablation_{path.stem}"
    method = recipe.method
    levels = set(method.mix_levels)
    assert path.stem.startswith({"alignmixup": "alignmixup_"}.get(method.name, ("ae_", "vae_")))
    assert recipe.model.ae.variational == path.stem.startswith("vae_")
    if path.stem.endswith("_unaligned"):
        assert not method.align
    if levels & {"A", "E"} and not path.stem.endswith("_unaligned"):
        assert method.align
    text = path.read_text()
    assert "paper top-1 accuracy" in text.splitlines()[0]


@pytest.mark.parametrize(
    ("overrides", "ae", "message"),
    [
        (["method.mix_levels=[x,e,E]"], {}, r"method\.mix_levels"),
        (["method.mix_levels=[x,x]"], {}, r"method\.mix_levels"),
        (["method.mix_levels=[E]"], {"embedding": "vector", "grid": 4}, r"method\.mix_levels"),
        (["method.mix_levels=[e]"], {"embedding": "vector"}, r"model\.ae\.grid"),
        (["method.align_pool=0"], {}, r"method\.align_pool"),
        (["method.mix_levels=[x,e]"], {"variational": True}, r"model\.ae\.variational"),
    ],
)
def test_bad_ablation_settings_name_the_key(overrides, ae, message):
    with pytest.raises(RecipeError, match=message):
        _setup("alignmixup", *overrides, ae=ae)


def test_a_grid_that_does_not_match_says_so():
    m, model = _setup("alignmixup", "method.mix_levels=[e]", ae={"embedding": "vector", "grid": 2})
    with pytest.raises(ValueError, match=r"model\.ae\.grid is 2, but A is 4×4"):
        m(model, *_batch(), torch.Generator().manual_seed(0))
