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

from pipeline.methods.base import MixSettings
from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import register_method
from pipeline.mixing import MixSample
from pipeline.mixing.boxes import paste_boxes, saliency_boxes


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
class SaliencyMix(PairMix):
    """λ and π from the step's generators; the box from the partner's saliency (no further
    draws); λ corrected to the share of each image left unpasted (the box is clipped at the
    border, and a peak near the border clips it often)."""

    Settings = SaliencyMixSettings

    def mix_images(self, images: Tensor, s: MixSample, choices: torch.Generator) -> Mixed:
        per_image = self.settings.boxes == "per_image"
        with self.section("saliency"):
            boxes = saliency_boxes(images, s.perm, s.lam, per_image)
        with self.section("mix"):
            mixed, lam = paste_boxes(images, s.perm, boxes)
        return Mixed(mixed, lam if per_image else float(lam[0]))  # one box for all: one λ
