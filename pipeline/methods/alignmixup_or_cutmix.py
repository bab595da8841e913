"""AlignMixup or CutMix: each batch is CutMix with probability `cutmix_prob`, else AlignMixup."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.alignmixup import AlignMixup, AlignSettings
from pipeline.methods.base import Method, MethodContext, coin
from pipeline.methods.cutmix import CutMix, CutMixSettings
from pipeline.methods.registry import register_method
from pipeline.models import MixNet


class AlignMixupOrCutMixSettings(AlignSettings):
    cutmix_alpha: float = Field(1.0, gt=0, description="CutMix batches: λ ~ Beta(α, α)")
    cutmix_prob: float = Field(0.5, ge=0, le=1, description="P(a batch is CutMix)")


@register_method("alignmixup_or_cutmix")
class AlignMixupOrCutMix(Method):
    """Per batch, CutMix (its own α) or AlignMixup (α and the solver of these settings)."""

    Settings = AlignMixupOrCutMixSettings

    def __init__(
        self, settings: AlignMixupOrCutMixSettings, context: MethodContext | None = None
    ) -> None:
        """Its two methods, built from these settings: CutMix's α, and all the aligning ones."""
        super().__init__(settings, context)
        cutmix = CutMixSettings(name=CutMix.name, alpha=settings.cutmix_alpha, draws=settings.draws)
        self.cutmix = CutMix(cutmix, self.context)
        aligning = {key: getattr(settings, key) for key in AlignSettings.model_fields}
        aligned = AlignMixup.Settings(**{**aligning, "name": AlignMixup.name})
        self.alignmixup = AlignMixup(aligned, self.context)
        self.cutmix.range_prefix = self.alignmixup.range_prefix = self.name  # sections: ours

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        cut = coin(self.settings.cutmix_prob, self.choice_generator(rng))
        chosen = self.cutmix if cut else self.alignmixup
        return chosen(model, images, labels, rng)
