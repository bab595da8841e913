"""What a recipe asks for, built once for the trainer: the accelerator, then (in this order, which
fixes the random draws) the loaders, the method, the model, the optimiser, the EMA and the lr
schedule, with the run's clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from pipeline.errors import CheckpointError, RecipeError
from pipeline.methods import Method, MethodContext, build_method, method_class
from pipeline.models import MixNet, count_parameters
from pipeline.recipe import Recipe
from pipeline.runs.checkpoints import TrainerState
from pipeline.runs.model_file import read_weights
from pipeline.training.clock import Clock
from pipeline.training.optim import build_optimizer, build_schedule, scaled_lr
from pipeline.training.step import MethodRunner, StepSettings


@dataclass
class RunParts:
    """The built run: data, model and method (wrapped and prepared), optimiser, schedule, EMA."""

    loaders: Any  # pipeline.data.Loaders
    model: MixNet  # the bare model (checkpoints, EMA, the model file)
    method: Method
    runner: torch.nn.Module  # MethodRunner, prepared by Accelerate (DDP)
    optimizer: torch.optim.Optimizer
    set_lr: Any  # callable: optimiser steps since the start -> sets the lr
    ema: Any  # timm ModelEmaV3, or None
    clock: Clock
    num_classes: int
    base_lr: float
    settings: StepSettings

    @property
    def num_params(self) -> int:
        return count_parameters(self.model)


def make_accelerator(recipe: Recipe):
    """Accelerate for the recipe: AMP, CPU or not, DDP's unused-parameter search when the method
    leaves parameters unused, and the collectives' timeout."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cfg = recipe.train
    unused = method_class(recipe.method.name).needs(recipe.method).unused_parameters
    handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=bool(unused)),
        InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.collective_timeout_minutes)),
    ]
    return Accelerator(mixed_precision=cfg.amp, cpu=cfg.cpu, kwargs_handlers=handlers)


def build_run(recipe: Recipe, accelerator, index_dir) -> RunParts:
    """Everything the recipe asks for, on this rank; `index_dir` holds a dataset index that
    cannot be written beside the data."""
    cfg, acc = recipe.train, accelerator
    loaders = _loaders(recipe, acc, index_dir)
    num_classes = recipe.model.num_classes or loaders.num_classes
    method = build_method(recipe.method, method_context(recipe, acc.process_index, num_classes))
    model = _model(recipe, method, num_classes)
    steps_per_epoch = len(loaders.train)  # loader batches (micro-batches)
    accum = _accumulation(cfg, recipe.data.batch_size * acc.num_processes)
    base_lr = scaled_lr(recipe.optim, recipe.data.batch_size * acc.num_processes * accum)
    optimizer = build_optimizer(recipe.optim, model, base_lr)
    runner, optimizer = acc.prepare(MethodRunner(model, method), optimizer)
    ema = _ema(model, cfg.ema_decay, acc)
    if recipe.model.compile:  # after the EMA's copy, which stays eager
        model.compile_parts()
    total = cfg.epochs * steps_per_epoch
    clock = Clock(TrainerState(), steps_per_epoch, accum, min(total, cfg.max_steps or total))
    set_lr = build_schedule(recipe.optim, optimizer, base_lr, cfg.epochs, clock.updates_per_epoch)
    settings = StepSettings(recipe.optim.grad_clip, recipe.model.channels_last)
    return RunParts(loaders, model, method, runner, optimizer, set_lr, ema, clock, num_classes,
                    base_lr, settings)  # fmt: skip


def method_context(recipe: Recipe, rank: int, num_classes: int | None = None) -> MethodContext:
    """What the method of `recipe` is told of the run, on the process of global rank `rank`."""
    return MethodContext(
        rank=rank,
        label_smoothing=recipe.optim.label_smoothing,
        num_classes=num_classes or recipe.model.num_classes,
        mean=tuple(recipe.data.mean),
        std=tuple(recipe.data.std),
    )


def _loaders(recipe: Recipe, accelerator, index_dir):
    """This rank's train and val loaders, after seeding every generator from `train.seed`."""
    from accelerate.utils import set_seed

    from pipeline.data import build_loaders

    acc = accelerator
    set_seed(recipe.train.seed, device_specific=False)
    return build_loaders(
        recipe.data,
        acc.process_index,
        acc.num_processes,
        acc.device,
        recipe.train.seed,
        index_fallback_dir=index_dir,
    )


def _model(recipe: Recipe, method: Method, num_classes: int) -> MixNet:
    """The method's model for the recipe, from pretrained weights if it names them."""
    model = method.build_model(recipe.model, num_classes)
    if recipe.model.pretrained:
        _load_pretrained(model, recipe.model.pretrained)
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _ema(model: MixNet, decay: float | None, accelerator):
    """timm's EMA of the model (a copy on its device, saved in checkpoints), or None."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def _accumulation(cfg, batch_all_gpus: int) -> int:
    """Micro-batches per optimiser step: `train.grad_accum_steps`, or from `train.global_batch`."""
    if cfg.global_batch is None:
        return cfg.grad_accum_steps
    if cfg.grad_accum_steps != 1:
        raise RecipeError("train.global_batch and train.grad_accum_steps: set one of them")
    if cfg.global_batch % batch_all_gpus:
        raise RecipeError(
            f"train.global_batch: {cfg.global_batch} is not a multiple of data.batch_size × GPUs "
            f"= {batch_all_gpus}"
        )
    return cfg.global_batch // batch_all_gpus


def _load_pretrained(model: MixNet, path: str) -> None:
    """Start from a trained model's weights (e.g. ImageNet for CUB): every tensor whose name and
    shape match, so the classifier is skipped when the number of classes differs."""
    source, _, _ = read_weights(path)
    own = model.state_dict()
    weights = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("stages.") for k in weights):
        raise CheckpointError(
            f"model.pretrained: {path} shares no backbone weights with this recipe's model"
        )
    model.load_state_dict(weights, strict=False)
