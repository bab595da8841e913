"""Gradient accumulation: k micro-batches of B make the optimiser step of their mean loss, each
micro-batch mixed within itself; DDP all-reduces once per optimiser step; the lr follows the
effective batch; `train.global_batch` derives k. (Exact resume mid-step: test_trainer.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from pipeline.methods import build_method
from pipeline.recipe import load_recipe
from pipeline.training.optim import build_optimizer
from pipeline.training.step import MethodRunner, MicroBatch, step_generator, train_step

B = 8
TINY = ["model.name=test_resnet", "model.output_stride=8", "model.channels_last=false"]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="no")


@pytest.mark.parametrize("method_name", ["baseline", "input_mixup"])
def test_two_micro_batches_make_the_step_of_their_mean_loss(accelerator, method_name):
    recipe = load_recipe(None, [f"method.name={method_name}", *TINY])
    method = build_method(recipe.method)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2 * B, 3, 32, 32, generator=g), torch.randint(10, (2 * B,), generator=g)
    halves = [(x[:B], y[:B], 0), (x[B:], y[B:], 1)]  # each micro-batch draws from its own step

    def fresh():
        torch.manual_seed(0)
        model = method.build_model(recipe.model, 10)
        return model, build_optimizer(recipe.optim, model, lr=0.1)

    # Reference, by hand: one SGD step on the mean of the two micro-batches' losses.
    model, opt = fresh()
    model.train()
    losses = [method(model, xb, yb, step_generator(0, s)).loss for xb, yb, s in halves]
    (sum(losses) / 2).backward()
    opt.step()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model, opt = fresh()
    runner, opt = accelerator.prepare(MethodRunner(model, method), opt)
    for i, (xb, yb, s) in enumerate(halves):
        train_step(
            accelerator, runner, opt, xb, yb, step_generator(0, s), micro=MicroBatch(2, i == 1)
        )
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_lr_follows_the_effective_batch_and_global_batch_derives_k(tiny_overrides):
    from pipeline.errors import RecipeError
    from pipeline.training import Trainer

    def trainer(*extra):
        return Trainer(load_recipe(None, tiny_overrides("tracking.enabled=false", *extra)))

    one, four = trainer().parts, trainer("train.grad_accum_steps=4").parts
    assert four.base_lr == pytest.approx(4 * one.base_lr)  # lr × (16 × 4) / 16
    assert four.clock.updates_per_epoch == -(-one.clock.steps_per_epoch // 4)
    derived = trainer("train.global_batch=64").parts  # 16 per step on one process
    assert derived.clock.accum == 4 and derived.base_lr == pytest.approx(four.base_lr)
    with pytest.raises(RecipeError, match=r"train\.global_batch: 40 is not a multiple"):
        trainer("train.global_batch=40")


DDP_COUNT = """
import json, sys, torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from pipeline.recipe import load_recipe
from pipeline.training import Trainer
trainer = Trainer(load_recipe(None, sys.argv[2:]))
calls = [0]
def counting(state, bucket):
    calls[0] += bucket.index() == 0  # once per synced backward pass, however many buckets
    return allreduce_hook(state, bucket)
trainer.parts.runner.register_comm_hook(dist.group.WORLD, counting)
trainer.fit()
if trainer.accelerator.is_main_process:
    json.dump(calls[0], open(sys.argv[1], "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_all_reduces_once_per_optimiser_step(tiny_overrides, subprocess_env, tmp_path):
    script = tmp_path / "count.py"
    script.write_text(DDP_COUNT)
    counts = {}
    for accum in (1, 2):
        out = tmp_path / f"calls{accum}.json"
        overrides = tiny_overrides(
            f"name=ddp{accum}",
            "train.max_steps=4",
            f"train.grad_accum_steps={accum}",
            "tracking.enabled=false",
            output=f"run{accum}",
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", str(script), str(out), *overrides]  # fmt: skip
        proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts[accum] = json.loads(out.read_text())
    # 4 micro-batches: 4 all-reducing backward passes without accumulation, 2 with 2 per step
    assert counts == {1: 4, 2: 2}
