"""The method registry: `@register_method("name")` on a `Method` subclass, as timm's
`@register_model`. A recipe's `method.name` looks the class up here; nothing else lists methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pipeline.config import MethodSettings

if TYPE_CHECKING:
    from pipeline.methods.base import Method, MethodContext

__all__ = ["build_method", "method_class", "method_names", "register_method", "settings_class"]

M = TypeVar("M", bound="type[Method]")
_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a `Method` subclass the method called `name` in recipes."""

    def register(cls: M) -> M:
        from pipeline.methods.base import Method

        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}): {cls!r} is not a Method subclass")
        if not issubclass(cls.Settings, MethodSettings):
            raise TypeError(
                f"@register_method({name!r}): {cls.__name__}.Settings is not a MethodSettings "
                "subclass"
            )
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(
                f"@register_method({name!r}): already registered by {_METHODS[name].__module__}"
            )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """Registered method names, sorted (tables order them: `pipeline.tools.method_order`)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as `name`; ValueError naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered: {', '.join(method_names())}"
        ) from None


def settings_class(name: str) -> type[MethodSettings]:
    """The settings class that validates a `method` section naming `name`."""
    return method_class(name).Settings


def build_method(settings: MethodSettings, context: MethodContext | None = None) -> Method:
    """The method `settings.name` names, with those settings (a recipe's `method` section), in
    the run that `context` describes (rank, label smoothing, classes, data normalisation)."""
    return method_class(settings.name)(settings, context)
