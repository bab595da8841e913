"""Mixing methods as training hooks: one file per method, each a thin registered class over the
plain functions of `pipeline.mixing`. A recipe's `method.name` picks one.

Every module in this folder except `base` and `registry` (and names starting with `_`) is
imported here, so that adding a method is adding a file: its `@register_method` runs on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.methods.base import Method, MethodContext, MethodOutput, MixSettings, ModelNeeds
from pipeline.methods.pair_mix import Mixed, PairMix
from pipeline.methods.registry import (
    build_method,
    method_class,
    method_names,
    register_method,
    settings_class,
)

__all__ = [
    "Method",
    "MethodContext",
    "MethodOutput",
    "MixSettings",
    "Mixed",
    "ModelNeeds",
    "PairMix",
    "build_method",
    "method_class",
    "method_names",
    "register_method",
    "settings_class",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry") and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
