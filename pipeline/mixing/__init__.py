"""Mixing operators: plain functions on tensors, no module state (see docs/mixing.md)."""

from pipeline.mixing.align import align, align_features, align_mix, mix_aligned
from pipeline.mixing.basic import (
    MixSample,
    cutmix,
    cutmix_box,
    input_mixup,
    mix,
    mixed_cross_entropy,
    per_sample_mixed_cross_entropy,
    sample_mix,
)
from pipeline.mixing.sinkhorn import SinkhornOptions, SinkhornResult, sinkhorn, squared_cost

__all__ = [
    "MixSample",
    "SinkhornOptions",
    "SinkhornResult",
    "align",
    "align_features",
    "align_mix",
    "cutmix",
    "cutmix_box",
    "input_mixup",
    "mix",
    "mix_aligned",
    "mixed_cross_entropy",
    "per_sample_mixed_cross_entropy",
    "sample_mix",
    "sinkhorn",
    "squared_cost",
]
