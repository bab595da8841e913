"""Training hooks, one per mixing method; the recipe's `method.name` picks one.

The trainer only ever calls `hook(model, images, labels, rng) -> HookOutput`.
"""

from __future__ import annotations

from pipeline.config import Recipe
from pipeline.hooks.alignmixup import AlignMixupAEHook, AlignMixupHook, AlignMixupOrCutMixHook
from pipeline.hooks.base import Hook, HookOutput, HookTimer
from pipeline.hooks.standard import BaselineHook, CutMixHook, InputMixupHook, ManifoldMixupHook
from pipeline.models import MixNet, build_model

__all__ = ["HOOKS", "Hook", "HookOutput", "HookTimer", "build_hook", "build_model_and_hook"]

HOOKS: dict[str, type[Hook]] = {
    "baseline": BaselineHook,
    "input_mixup": InputMixupHook,
    "cutmix": CutMixHook,
    "manifold_mixup": ManifoldMixupHook,
    "alignmixup": AlignMixupHook,
    "alignmixup_ae": AlignMixupAEHook,
    "alignmixup_or_cutmix": AlignMixupOrCutMixHook,
}


def build_hook(recipe: Recipe) -> Hook:
    """The hook for `recipe.method.name`."""
    return HOOKS[recipe.method.name](recipe.method, recipe.optim.label_smoothing)


def build_model_and_hook(recipe: Recipe, num_classes: int) -> tuple[MixNet, Hook]:
    """The hook and a model with what it needs (the decoder for AlignMixup/AE)."""
    hook = build_hook(recipe)
    return build_model(recipe.model, num_classes, autoencoder=hook.needs_decoder), hook
