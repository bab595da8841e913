"""SaliencyMix (Uddin et al., ICLR 2021): CutMix with the box centred on the partner's most
salient pixel (OpenCV's fine-grained saliency), labels weighted by the box's area.

By default one box per batch, from the first partner image, as the authors' training scripts
do (github.com/afm-shahab-uddin/SaliencyMix); `boxes: per_image` gives every sample the box of
its own partner, as the paper describes. The saliency runs in OpenCV on the CPU: the partner
image(s) are copied off the device each step (docs/mixing.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pipeline.methods.base import Method, MethodOutput, MixSettings
from pipeline.methods.registry import register_method
from pipeline.mixing import mixed_cross_entropy, per_sample_mixed_cross_entropy, sample_mix
from pipeline.mixing.boxes import paste_boxes, saliency_boxes
from pipeline.models import MixNet


class SaliencyMixSettings(MixSettings):
    alpha: float = Field(
        1.0, gt=0, description="λ ~ Beta(α, α); the authors' --beta 1 (CIFAR and ImageNet)"
    )
    boxes: Literal["batch", "per_image"] = Field(
        "batch",
        description="batch: one box per step around the first partner's saliency peak (the "
        "authors' code, one OpenCV call); per_image: each sample's box around its own "
        "partner's peak (the paper's description, B OpenCV calls on the CPU per step)",
    )


@register_method("saliencymix")
class SaliencyMix(Method):
    """λ and π from the step's generators; the box from the partner's saliency (no further
    draws); λ corrected to the share of each image left unpasted (the box is clipped at the
    border, and a peak near the border clips it often)."""

    Settings = SaliencyMixSettings

    def __call__(self, model: MixNet, images: Tensor, labels: Tensor, rng: torch.Generator):
        choices = self.choice_generator(rng)
        s = sample_mix(images.shape[0], self.settings.alpha, images.device, rng, choices)
        per_image = self.settings.boxes == "per_image"
        with self.section("saliency"):
            boxes = saliency_boxes(images, s.perm, s.lam, per_image)
        with self.section("mix"):
            mixed, lam = paste_boxes(images, s.perm, boxes)
        logits = model(mixed)
        if per_image:
            lam_dev = lam.to(images.device, torch.float32)
            loss = per_sample_mixed_cross_entropy(
                logits, labels, s.perm, lam_dev, self.label_smoothing
            )
            return MethodOutput(loss, logits, {"lam": lam.mean().float()})
        lam_box = float(lam[0])  # one box for all: one λ
        loss = mixed_cross_entropy(logits, labels, s.perm, lam_box, self.label_smoothing)
        return MethodOutput(loss, logits, {"lam": torch.tensor(lam_box)})
