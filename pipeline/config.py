"""Recipes: the YAML schema every knob lives in, validated on load.

A recipe is a YAML file with the sections below. Unknown keys and wrong types are errors that
name the file and the dotted key; `key=value` overrides from the CLI go through the same
validation. The schema is written with pydantic so that validation, defaults and error paths
come from a library rather than hand-written checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import RecipeError

__all__ = ["METHODS", "Recipe", "RecipeError", "apply_overrides", "dump_recipe", "load_recipe"]

METHODS = (
    "baseline",
    "input_mixup",
    "cutmix",
    "manifold_mixup",
    "alignmixup",
    "alignmixup_ae",
    "alignmixup_or_cutmix",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(_Section):
    """Which mixing hook trains the model, and its knobs (SPEC.md §1–4)."""

    name: Literal[METHODS] = "baseline"  # type: ignore[valid-type]
    alpha: float = Field(2.0, gt=0, description="λ ~ Beta(α, α)")
    sinkhorn: Literal["authors", "converged"] = "authors"
    sinkhorn_eps: float = Field(0.1, gt=0)
    sinkhorn_max_iter: int | None = Field(
        None, ge=1, description="None: 100 for authors, 1000 for converged"
    )
    manifold_levels: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3],
        description="levels manifold mixup draws from (0 = input, k = after stage k)",
    )
    cutmix_alpha: float = Field(1.0, gt=0, description="CutMix λ ~ Beta(α, α) (timm default 1)")
    cutmix_prob: float = Field(0.5, ge=0, le=1, description="alignmixup_or_cutmix: P(CutMix)")
    ae_clean_prob: float = Field(0.2, ge=0, le=1, description="AE: share of clean batches")
    ae_recon_weight: float = Field(1.0, ge=0, description="AE: weight of L_r on clean batches")
    ae_mix_levels: list[Literal["x", "A", "e"]] = Field(default_factory=lambda: ["x", "A", "e"])


class AEConfig(_Section):
    """AlignMixup/AE: `f` (A → e), decoder `D` (e → x̂); see pipeline/models/autoencoder.py."""

    embed_channels: int = Field(1024, ge=8, description="E: channels of e (d = E·h·w)")
    decoder_width: int = Field(656, ge=8, description="channels of the decoder's first stage")
    decoder_min_width: int = Field(64, ge=8)
    decoder_blocks: int = Field(2, ge=1, description="residual blocks per decoder stage")
    decoder_output_stride: Literal[1, 2, 4, 8] = Field(
        4, description="convolutions stop at 1/this of the input size; bilinear upsampling ends"
    )


class ModelConfig(_Section):
    name: str = "resnet50"
    num_classes: int | None = Field(None, ge=2, description="None: from the dataset")
    pretrained: str | None = Field(None, description="path to a checkpoint to start from")
    output_stride: Literal[8, 16, 32] = 32
    channels_last: bool = True
    compile: bool = False
    ae: AEConfig = Field(default_factory=AEConfig)


class DataConfig(_Section):
    backend: Literal["dali", "torchvision"] = "dali"
    root: str = "data/imagenet"
    layout: Literal["imagefolder", "filelist", "cub"] = "imagefolder"
    train_list: str | None = Field(None, description="filelist layout: 'path label' lines")
    val_list: str | None = None
    batch_size: int = Field(256, ge=1, description="per device")
    val_batch_size: int | None = Field(None, ge=1)
    num_threads: int = Field(4, ge=1, description="DALI threads / DataLoader workers")
    train_size: int = Field(224, ge=8)
    val_resize: int = Field(256, ge=8)
    val_crop: int = Field(224, ge=8)
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation")
    lighting: float = Field(0.1, ge=0, description="PCA lighting alphastd")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    skip_corrupt: bool = False
    max_val_samples: int | None = Field(None, ge=1)


class OptimConfig(_Section):
    name: Literal["authors_sgd", "timm"] = "authors_sgd"
    timm_opt: str = Field("sgd", description="timm.optim.create_optimizer_v2 opt name")
    lr: float = Field(0.1, gt=0, description="at reference_batch; scaled linearly")
    reference_batch: int = Field(256, ge=1, description="lr is lr * global_batch / this")
    scale_lr: bool = True
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine", "timm"] = "step"
    timm_sched: str = Field("cosine", description="timm.scheduler.create_scheduler_v2 name")
    milestones: list[int] = Field(default_factory=lambda: [75, 150, 225], description="epochs")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    head_lr_ratio: float = Field(
        1.0, gt=0, description="lr multiplier for head_params (wsolevaluation's classifier ratio)"
    )
    head_params: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes that get head_lr_ratio, e.g. [stages.3., classifier.]",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(300, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop early after this many steps")
    amp: Literal["no", "bf16", "fp16"] = "bf16"
    seed: int = 0
    output_dir: str | None = Field(None, description="None: runs/<name>")
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(1, ge=1, description="epochs between validations")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    resume: Literal["auto", "never"] | str = "auto"
    preempt_check_every: int = Field(20, ge=1, description="steps between preemption checks")
    cpu: bool = False
    progress: bool = True

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_no_means_no(cls, v: Any) -> Any:
        """YAML reads a bare `no` as False; it means no mixed precision."""
        return "no" if v is False else v


class TrackingConfig(_Section):
    experiment: str = "alignmixup"
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI or sqlite")
    run_name: str | None = None
    system_metrics: bool = True


class Recipe(_Section):
    """A whole recipe; `name` labels the run."""

    name: str = "run"
    method: MethodConfig = Field(default_factory=MethodConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"name must be non-empty and contain no '/', got {v!r}")
        return v

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every value (MLflow params)."""
        return dict(_flatten(self.model_dump(mode="json")))


def _flatten(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
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
