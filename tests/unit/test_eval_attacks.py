"""FGSM / PGD on a small network trained in the test on scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from pipeline.data.augment import unnormalize
from pipeline.evaluation.attacks import fgsm, pgd, pixel_model
from pipeline.evaluation.run import ATTACKS, evaluate_model

MEAN, STD = (0.5,), (0.5,)


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP on normalised 8×8 digits, trained for 150 steps; test pixels, labels."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # [0, 1] pixels
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    normalised = (x[:1500] - MEAN[0]) / STD[0]
    for step in range(150):
        idx = torch.arange(step * 64, step * 64 + 64) % 1500
        loss = nn.functional.cross_entropy(model(normalised[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x[1500:], y[1500:]


def _error(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) != y).float().mean().item()


def test_protocol_constants_are_the_papers():
    assert ATTACKS["fgsm"] == {"eps": 8 / 255}
    assert ATTACKS["pgd"] == {
        "eps": 4 / 255,
        "step": 2 / 255,
        "iterations": 20,
        "random_start": True,
    }


def test_normalisation_inside_the_model_matches_the_loader_view(digits_model):
    model, x, _ = digits_model
    normalised = (x - MEAN[0]) / STD[0]
    torch.testing.assert_close(unnormalize(normalised, MEAN, STD), x)
    torch.testing.assert_close(pixel_model(model, MEAN, STD)(x), model(normalised))


def test_fgsm_with_zero_epsilon_changes_nothing(digits_model):
    model, x, y = digits_model
    net = pixel_model(model, MEAN, STD)
    assert torch.equal(fgsm(net, x, y, eps=0.0), x)
    assert torch.equal(pgd(net, x, y, eps=0.0, step=2 / 255, iterations=3), x)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_inputs_stay_in_the_ball_and_in_range(digits_model, attack):
    model, x, y = digits_model
    net = pixel_model(model, MEAN, STD)
    eps = ATTACKS[attack]["eps"]
    if attack == "fgsm":
        adv = fgsm(net, x, y, eps)
    else:
        adv = pgd(net, x, y, generator=torch.Generator().manual_seed(0), **ATTACKS["pgd"])
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert (adv != x).any()  # it did move
    assert not any(p.grad is not None for p in model.parameters())  # input gradient only


def test_pgd_is_at_least_as_strong_as_fgsm_at_the_same_epsilon(digits_model):
    model, x, y = digits_model
    net = pixel_model(model, MEAN, STD)
    eps = 8 / 255
    fgsm_adv = fgsm(net, x, y, eps)
    pgd_adv = pgd(net, x, y, eps, 2 / 255, 20, generator=torch.Generator().manual_seed(0))
    clean, fgsm_err, pgd_err = (_error(net, a, y) for a in (x, fgsm_adv, pgd_adv))
    assert clean < 0.15  # the network did learn
    assert fgsm_err > clean + 0.02  # the attack hurts
    assert pgd_err >= fgsm_err
    # On a nearly linear network both reach about the same corner of the ball (here the same
    # error count); the iterated attack still ends higher on the loss it ascends.
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(net(a), y).item() for a in (fgsm_adv, pgd_adv)]
    assert losses[1] > losses[0]


def test_evaluate_model_matches_direct_computation(digits_model):
    model, x, y = digits_model
    normalised = (x - MEAN[0]) / STD[0]
    labels = y.clone()
    labels[-5:] = -1  # loader padding: ignored by every metric
    batches = [(normalised[i : i + 100], labels[i : i + 100]) for i in range(0, len(x), 100)]
    noise = [torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1))]
    results = evaluate_model(
        model,
        batches,
        ("classify", "fgsm", "ood"),
        MEAN,
        STD,
        {"noise": [(n - 0.5) / 0.5 for n in noise]},
    )
    keep = labels >= 0
    net = pixel_model(model, MEAN, STD)
    assert results["top1_err"] == pytest.approx(100 * _error(model, normalised[keep], y[keep]))
    fgsm_err = _error(net, fgsm(net, x[keep], y[keep], 8 / 255), y[keep])
    assert results["fgsm_err"] == pytest.approx(100 * fgsm_err)
    assert set(results) >= {
        "top5_err",
        "ood/noise/auroc",
        "ood/noise/det_acc",
        "ood/noise/aupr_out",
    }
    assert "pgd_err" not in results and "ece" not in results
