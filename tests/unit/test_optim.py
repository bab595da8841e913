"""Learning rates: the authors' step decay, warm-up, linear scaling and the head lr ratio,
against values worked by hand."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.training.optim import build_optimizer, build_schedule, scaled_lr


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        self.classifier = torch.nn.Linear(2, 3)


def _optim(*overrides):
    return load_recipe(None, list(overrides)).optim


def test_linear_scaling_rule():
    cfg = _optim("optim.lr=0.1", "optim.reference_batch=1024")
    assert scaled_lr(cfg, 1024) == pytest.approx(0.1)
    assert scaled_lr(cfg, 4096) == pytest.approx(0.4)
    assert scaled_lr(_optim("optim.scale_lr=false"), 4096) == pytest.approx(0.1)


def test_authors_step_schedule_by_hand():
    cfg = _optim("optim.milestones=[75,150,225]")
    opt = build_optimizer(cfg, _Net(), 0.1)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    set_lr = build_schedule(cfg, opt, 0.1, epochs=300, steps_per_epoch=10)
    for step, expected in [(0, 0.1), (749, 0.1), (750, 0.01), (1500, 1e-3), (2999, 1e-4)]:
        assert set_lr(step) == pytest.approx(expected), step
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_warmup_then_cosine():
    cfg = _optim("optim.schedule=cosine", "optim.warmup_epochs=1")
    opt = build_optimizer(cfg, _Net(), 1.0)
    set_lr = build_schedule(cfg, opt, 1.0, epochs=3, steps_per_epoch=4)
    assert [set_lr(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert set_lr(8) == pytest.approx(0.5)  # halfway through the 8 cosine steps
    assert set_lr(12) == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["step", "cosine", "timm"])
def test_a_fractional_warmup_is_stepped_per_update(schedule):
    # 0.5 epoch of 8 steps: 4 warm-up steps rising linearly, then the schedule proper.
    cfg = _optim(f"optim.schedule={schedule}", "optim.warmup_epochs=0.5", "optim.milestones=[9]")
    opt = build_optimizer(cfg, _Net(), 1.0)
    set_lr = build_schedule(cfg, opt, 1.0, epochs=10, steps_per_epoch=8)
    lrs = [set_lr(s) for s in range(8)]
    if schedule == "timm":  # timm ramps from its warmup_lr (1e-5) over t = 0..3
        expected = [1e-5 + t * (1.0 - 1e-5) / 4 for t in range(4)]
    else:
        expected = [(t + 1) / 4 for t in range(4)]
    assert lrs[:4] == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1.0, abs=0.01)  # warm-up over after half an epoch
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3]


def test_head_params_get_the_ratio():
    cfg = _optim("optim.head_lr_ratio=10", "optim.head_params=[stages.1., classifier.]")
    net = _Net()
    opt = build_optimizer(cfg, net, 0.01)
    set_lr = build_schedule(cfg, opt, 0.01, epochs=100, steps_per_epoch=1)
    set_lr(0)
    body, head = opt.param_groups
    assert body["lr"] == pytest.approx(0.01) and head["lr"] == pytest.approx(0.1)
    head_ids = {id(p) for p in head["params"]}
    assert head_ids == {id(p) for p in [*net.stages[1].parameters(), *net.classifier.parameters()]}
    assert set_lr(16) == pytest.approx(0.01) and head["lr"] == pytest.approx(0.1)


def test_head_params_that_match_nothing_are_an_error():
    cfg = _optim("optim.head_lr_ratio=10", "optim.head_params=[layer4.]")
    with pytest.raises(RecipeError, match=r"optim\.head_params"):
        build_optimizer(cfg, _Net(), 0.01)


def test_timm_optimizer_and_scheduler():
    cfg = _optim(
        "optim.name=timm", "optim.timm_opt=adamw", "optim.schedule=timm", "optim.weight_decay=0.05"
    )
    opt = build_optimizer(cfg, _Net(), 1e-3)
    assert type(opt).__name__ == "AdamW"
    set_lr = build_schedule(cfg, opt, 1e-3, epochs=10, steps_per_epoch=5)
    assert set_lr(0) == pytest.approx(1e-3)
    assert set_lr(49) < set_lr(25) < set_lr(0)
