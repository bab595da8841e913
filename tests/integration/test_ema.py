"""`train.ema_decay`: the EMA equals the closed form over the trained weights, survives a
preemption and resume exactly, is validated and saved beside the raw model, and `eval --weights
ema` reads it."""

from __future__ import annotations

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import CheckpointError
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import latest_checkpoint
from pipeline.runs.model_file import FINAL_MODEL, load_model, read_weights
from pipeline.training import Trainer
from pipeline.training.preempt import STOP_FILE

DECAY = 0.5  # large steps, so that a wrong formula shows


def _run(tiny_overrides, out: str, *extra: str) -> Trainer:
    trainer = Trainer(load_recipe(None, tiny_overrides(*extra, output=out)))
    trainer.fit()
    return trainer


def test_ema_is_the_closed_form_of_the_trained_weights(tiny_overrides, tmp_path):
    base = ("method.name=input_mixup", "tracking.enabled=false")
    first = Trainer(load_recipe(None, tiny_overrides(*base, "train.max_steps=1", output="p0")))
    initial = {k: v.detach().clone() for k, v in first.parts.model.state_dict().items()}
    # p_1, p_2, p_3: the same deterministic run stopped after 1, 2 and 3 steps, no EMA
    trained = []
    for k in (1, 2, 3):
        t = _run(tiny_overrides, f"p{k}", *base, f"train.max_steps={k}")
        trained.append(t.parts.model.state_dict())
    ema_run = _run(tiny_overrides, "ema", *base, "train.max_steps=3", f"train.ema_decay={DECAY}")
    ema, _, _ = read_weights(ema_run.output_dir / FINAL_MODEL, "ema")
    raw, _, _ = read_weights(ema_run.output_dir / FINAL_MODEL)
    for name, value in initial.items():
        torch.testing.assert_close(raw[name], trained[2][name])  # the EMA does not steer
        if not value.is_floating_point():  # counters are copied, not averaged
            assert torch.equal(ema[name], trained[2][name]), name
            continue
        # e_k = d e_{k-1} + (1 − d) p_k, e_0 = p_0
        expected = DECAY**3 * value
        for k, p in enumerate(trained, start=1):
            expected = expected + (1 - DECAY) * DECAY ** (3 - k) * p[name]
        torch.testing.assert_close(ema[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_ema_survives_preemption_and_is_validated_and_evaluated(tiny_overrides, tmp_path, capsys):
    extra = ("train.max_steps=4", "train.preempt_check_every=2", f"train.ema_decay={DECAY}")
    extra += ("tracking.enabled=false",)
    straight = _run(tiny_overrides, "straight", *extra)
    out = tmp_path / "resumed"
    out.mkdir()
    (out / STOP_FILE).touch()  # stop at step 2 with a checkpoint, then resume
    first = Trainer(load_recipe(None, tiny_overrides(*extra, output="resumed")))
    assert first.fit().preempted
    assert read_weights(latest_checkpoint(out), "ema")[0]  # the checkpoint holds the EMA
    _run(tiny_overrides, "resumed", *extra)
    for name, value in read_weights(straight.output_dir / FINAL_MODEL, "ema")[0].items():
        torch.testing.assert_close(read_weights(out / FINAL_MODEL, "ema")[0][name], value)
    assert "(EMA: " in capsys.readouterr().out  # validated beside the raw model
    ema_model, _, _ = load_model(out / FINAL_MODEL, "ema")
    raw_model, _, _ = load_model(out / FINAL_MODEL)
    assert not torch.equal(ema_model.classifier.weight, raw_model.classifier.weight)
    argv = ["eval", "--checkpoint", str(out), "--suite", "classify", "--no-mlflow"]
    assert main([*argv, "--weights", "ema"]) == 0
    assert "(ema weights)\n| metric   | value (%) |" in capsys.readouterr().out


def test_asking_for_an_ema_that_was_not_kept_is_named(tiny_overrides):
    run = _run(tiny_overrides, "plain", "train.max_steps=1", "tracking.enabled=false")
    with pytest.raises(CheckpointError, match=r"no EMA weights \(the run had no train.ema_decay"):
        load_model(run.output_dir / FINAL_MODEL, "ema")
