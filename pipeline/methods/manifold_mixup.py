"""Manifold mixup (Verma et al., 2019): mix the hidden state after a randomly drawn stage.

By default the level is drawn from {0, 1, 2} (the input, after stage 1, after stage 2), as in
Verma et al.'s code and in PuzzleMix's ImageNet code, where the paper's baseline figures come
from (docs/mixing.md).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from pipeline.errors import RecipeError
from pipeline.methods.base import Method, MethodOutput, MixSettings, uniform_choice
from pipeline.methods.registry import register_method
from pipeline.mixing import mix, mixed_cross_entropy, sample_mix
from pipeline.models import MixNet


class ManifoldMixupSettings(MixSettings):
    levels: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="levels to draw from (0 = input, k = after stage k; docs/models.md)",
    )


@register_method("manifold_mixup")
class ManifoldMixup(Method):
    """Mix at a level drawn uniformly from `levels` per batch, then run the rest of the model."""

    Settings = ManifoldMixupSettings

    def check_model(self, model: MixNet) -> None:
        if model.num_levels < 2:
            raise RecipeError(
                f"model.name: {model.timm_name!r} runs as a single stage here (no levels between "
                "the input and A), so manifold mixup would be input mixup or mixing at A; use "
                "a model split into stages (ResNets, ConvNeXt, ...) or another method"
            )
        beyond = [k for k in self.settings.levels if not 0 <= k <= model.num_levels]
        if beyond:
            raise RecipeError(
                f"method.levels: {beyond} not among this model's levels 0..{model.num_levels} "
                f"(0 = input, {model.num_levels} = the last feature tensor A)"
            )

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        level = uniform_choice(self.settings.levels, choices)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        hidden = model.forward_levels(images, 0, level)
        with self.section("mix"):
            hidden = mix(hidden, hidden[s.perm], s.lam)
        logits = model.head(model.forward_levels(hidden, level, model.num_levels))
        loss = mixed_cross_entropy(logits, labels, s.perm, s.lam, self.context.label_smoothing)
        stats = {"lam": torch.tensor(s.lam), "level": torch.tensor(float(level))}
        return MethodOutput(loss, logits, stats)
