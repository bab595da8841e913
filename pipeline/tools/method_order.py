"""The order of methods in tables (profile, compare, the benchmarks): the paper's, in one place."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["METHOD_ORDER", "method_rank", "ordered_methods"]

# The paper's Table 2 order, with ResizeMix and FMix (not in it) after its rivals and
# AlignMixup-or-CutMix after AlignMixup.
METHOD_ORDER = (
    "baseline",
    "input_mixup",
    "cutmix",
    "manifold_mixup",
    "puzzlemix",
    "saliencymix",
    "resizemix",
    "fmix",
    "alignmixup",
    "alignmixup_ae",
    "alignmixup_or_cutmix",
)
_RANK = {name: i for i, name in enumerate(METHOD_ORDER)}


def method_rank(name: str) -> tuple[int, str]:
    """Sort key of a method: its place in `METHOD_ORDER`; any other method after, by name."""
    return _RANK.get(name, len(METHOD_ORDER)), name


def ordered_methods(names: Iterable[str]) -> list[str]:
    """`names` sorted for a table: the paper's methods in its order, then the rest by name."""
    return sorted(names, key=method_rank)
