"""AlignMixup training pipeline.

The mixing operators are the public API: `from pipeline import align_mix, sample_mix, ...`
re-exports `pipeline.mixing` (see its `__all__`). They are imported on first use, so that
`import pipeline` (and `python -m pipeline --help`) does not import torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    import pipeline.mixing

    if name in pipeline.mixing.__all__:
        return getattr(pipeline.mixing, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
