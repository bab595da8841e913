"""AlignMixup training pipeline.

The mixing operators are the public API (`from pipeline import align_mix, sample_mix, ...`);
they are imported on first use so that `import pipeline` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MixSample",
    "SinkhornResult",
    "align",
    "align_features",
    "align_mix",
    "cutmix",
    "input_mixup",
    "mix",
    "mixed_cross_entropy",
    "sample_mix",
    "sinkhorn",
    "squared_cost",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import pipeline.mixing

        return getattr(pipeline.mixing, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
