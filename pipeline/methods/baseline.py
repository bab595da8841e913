"""Baseline: no mixing, cross-entropy on the clean batch (paper Table 2: 23.68 % top-1 error)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput
from pipeline.methods.registry import register_method
from pipeline.models import MixNet


@register_method("baseline")
class Baseline(Method):
    """No mixing: cross-entropy on the clean batch. Its settings are `name` alone."""

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        logits = model(images)
        return MethodOutput(self.clean_loss(logits, labels), logits)
