"""Optimisers and learning-rate schedules: the authors' SGD + step decay, or timm's factories."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import OptimConfig
from pipeline.errors import RecipeError


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: `lr × global_batch / reference_batch` (linear scaling) if enabled."""
    return cfg.lr * global_batch / cfg.reference_batch if cfg.scale_lr else cfg.lr


def param_groups(cfg: OptimConfig, model: nn.Module) -> list[dict]:
    """One group, or two when `head_params` get `head_lr_ratio` times the lr (CUB fine-tuning).

    Each group's `lr_scale` is applied by the schedule on every step.
    """
    head = [p for n, p in model.named_parameters() if n.startswith(tuple(cfg.head_params))]
    if not cfg.head_params or cfg.head_lr_ratio == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    if not head:
        raise RecipeError(f"optim.head_params: no parameter name starts with {cfg.head_params}")
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": cfg.head_lr_ratio}]


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum as in the authors' code, or any optimiser timm knows."""
    groups = param_groups(cfg, model)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if cfg.name == "authors_sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        groups, opt=cfg.timm_opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def build_schedule(
    cfg: OptimConfig,
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
) -> Callable[[int], float]:
    """A function `step -> lr` that also sets the optimiser's lr.

    The lr is a pure function of the global step, so a resumed run needs no scheduler state.
    `step` is the authors' decay (× gamma at each milestone epoch), `cosine` a per-step cosine
    to zero, `timm` any scheduler timm's `create_scheduler_v2` builds (stepped per update).
    All three honour `warmup_epochs`, fractions included: a linear warm-up stepped per update
    over round(warmup_epochs × steps_per_epoch) steps (from 0 here, from timm's `warmup_lr`
    for `timm`).
    """
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "timm":
        return _timm_schedule(cfg, optimizer, epochs, steps_per_epoch, warmup_steps)
    total_steps = epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cfg.schedule == "step":
            epoch = step / steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def set_lr(step: int) -> float:
        lr = base_lr * factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    return set_lr


def _timm_schedule(
    cfg: OptimConfig,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_steps: int,
) -> Callable[[int], float]:
    """timm's scheduler `optim.timm_sched`, stepped per update, as a function `step -> lr`."""
    from timm.scheduler import create_scheduler_v2

    sched, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.timm_sched,
        num_epochs=epochs,
        warmup_epochs=warmup_steps / steps_per_epoch,  # timm: × updates_per_epoch
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )

    def timm_lr(step: int) -> float:
        sched.step_update(step)
        return optimizer.param_groups[0]["lr"]

    return timm_lr
