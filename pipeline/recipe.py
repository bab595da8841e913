"""Recipes: a YAML file of sections, every knob validated on load.

Unknown keys and wrong types are errors that name the file and the dotted key; `key=value`
overrides from the CLI go through the same validation. The `method` section is validated by the
settings class of the method it names (each method file in pipeline/methods/ defines its own), so
a key of another method is an unknown key and MLflow logs only the chosen method's settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from pipeline.config import (
    DataConfig,
    MethodSettings,
    ModelConfig,
    OptimConfig,
    Section,
    TrackingConfig,
    TrainConfig,
)
from pipeline.errors import RecipeError
from pipeline.methods import method_class, settings_class

__all__ = ["Recipe", "RecipeError", "apply_overrides", "dump_recipe", "load_recipe"]


class _MethodName(BaseModel):
    """A method section's `name` alone, checked against the registry (so errors say the key)."""

    model_config = ConfigDict(extra="ignore")
    name: str = "baseline"

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        method_class(v)  # ValueError naming the registered methods
        return v


def _method_settings(value: Any) -> Any:
    """The `method` mapping validated by the settings class of the method it names."""
    if isinstance(value, MethodSettings):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with a 'name', got {value!r}")
    return settings_class(_MethodName.model_validate(value).name).model_validate(value)


class Recipe(Section):
    """A whole recipe; `name` labels the run."""

    name: str = "run"
    method: SerializeAsAny[MethodSettings] = Field(
        default_factory=lambda: _method_settings({"name": "baseline"})
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _dispatch_method(cls, v: Any) -> Any:
        return _method_settings(v)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"name must be non-empty and contain no '/', got {v!r}")
        if not v.replace(".", "").strip():  # runs/. or runs/.. : not a run folder of its own
            raise ValueError(
                "name must be a folder name of its own, not '.', '..' or only dots and spaces "
                "(the run folder defaults to runs/<name>)"
            )
        return v

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every value (MLflow params)."""
        return flatten_keys(self.model_dump(mode="json"))


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe tree as `{"section.key": value}`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  '{key}': {message} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (['a', 'b'], value parsed as YAML so numbers and lists get their type)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {text!r}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of a recipe, with `extends: other.yaml` (relative to it) merged under it."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise RecipeError(f"{path}: top level must be a mapping of sections")
    tree = loaded or {}
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: 'extends' must be a file name, got {parent!r}")
    return _deep_merge(_read_tree(path.parent / parent, (*seen, path.resolve())), tree)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate.

    A recipe may start with `extends: base.yaml` (a path relative to it): its keys are merged
    over the base's, section by section.
    """
    source = str(path) if path is not None else "<defaults>"
    return _validate(_read_tree(Path(path)) if path is not None else {}, overrides, source)


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...], source: str) -> Recipe:
    """A copy of `recipe` with `key=value` overrides, validated like a recipe file."""
    return _validate(recipe.model_dump(mode="json"), overrides, source)


def _validate(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> Recipe:
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value, text)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(_format_error(exc, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (logged as an MLflow artifact, re-loadable)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def print_config(recipes: list[Recipe]) -> int:
    """`--print-config`: print `recipes` as YAML documents that load back to the same recipes;
    the command's exit status, 0."""
    print("---\n".join(dump_recipe(r) for r in recipes), end="")
    return 0
