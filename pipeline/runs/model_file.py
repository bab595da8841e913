"""The final model file: weights in safetensors, with the facts needed to rebuild the model (the
recipe, the classes, whether it has a decoder, the MLflow run) as JSON in its header.

Nothing is unpickled on load, so a model file from anywhere is safe to open. `load_model` also
reads a run folder (its `model_final.safetensors`) or a checkpoint folder. A file it cannot use
(unreadable, a broken header, weights that do not fit the model the header describes) is a
CheckpointError of one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import CheckpointError, RecipeError
from pipeline.models.versions import architecture_version, check_architecture
from pipeline.recipe import Recipe, load_recipe
from pipeline.runs.checkpoints import (
    META_FILE,
    RECIPE_FILE,
    STATE_FILE,
    TrainerState,
    checkpoint_weights,
    error_cause,
    follow_umask,
    read_meta,
    read_state,
    storage_error,
)
from pipeline.runs.tracking import recorded_run_id

if TYPE_CHECKING:
    from pipeline.models import MixNet

FINAL_MODEL = "model_final.safetensors"
EMA_PREFIX = "ema/"  # the EMA of the weights, in the same file (train.ema_decay)
# where Accelerate keeps the EMA in a checkpoint folder: the trainer's only custom object
_EMA_IN_CHECKPOINT = "custom_checkpoint_0.pkl"
_HEADER_KEY = "alignmixup_pipeline"  # the safetensors metadata entry holding the JSON facts


def model_facts(model: MixNet, num_classes: int, class_names: list[str]) -> dict:
    """What a checkpoint or model file records about the model beside its weights."""
    return {
        "architecture_version": architecture_version(model.timm_name),
        "num_classes": num_classes,
        "class_names": list(class_names),
        "has_decoder": model.has_decoder,
        "has_embedding": model.has_embedding,  # f: AlignMixup/AE, or AlignMixup at e/E
    }


def save_final_model(
    path: Path,
    model: torch.nn.Module,
    recipe: Recipe,
    facts: dict[str, Any],
    state: TrainerState,
    ema: torch.nn.Module | None = None,
) -> None:
    """Write the model file atomically (a temporary name, then a rename); `ema`, the EMA of the
    weights, goes in the same file under `ema/<name>`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    header = {
        **facts,
        "recipe": recipe.model_dump(mode="json"),
        "mlflow_run_id": state.mlflow_run_id,
        "step": state.step,
    }
    # Cloned so that no two entries share storage, and into the default memory format:
    # safetensors refuses both shared and non-contiguous (channels-last) tensors.
    parts = {"": model, EMA_PREFIX: ema} if ema is not None else {"": model}
    weights = {
        prefix + k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
        for prefix, module in parts.items()
        for k, v in module.state_dict().items()
    }
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        save_file(weights, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
        follow_umask(tmp)  # safetensors writes 0600: labmates could not read the model
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        needed = sum(v.numel() * v.element_size() for v in weights.values())
        raise storage_error(f"model file {path}", path.parent, needed, exc) from None


def _read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get(_HEADER_KEY)
            names = fh.keys()
            weights = {key: fh.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: unreadable, truncated or corrupt ({error_cause(exc)})"
        ) from None
    if text is None:
        raise CheckpointError(
            f"{path}: not a model file this pipeline wrote (no {_HEADER_KEY} entry in its header)"
        )
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: the facts in its header are not valid JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the facts in its header are not a JSON object")
    return weights, header


def _header_recipe(header: dict[str, Any], path: Path) -> Recipe:
    """The recipe embedded in a model file's header, or one line saying what is wrong with it."""
    from pydantic import ValidationError

    raw = header.pop("recipe", None)
    if not isinstance(raw, dict):
        got = "missing" if raw is None else f"a {type(raw).__name__}, not a mapping"
        raise CheckpointError(f"{path}: the recipe in its header is {got}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise CheckpointError(f"{path}: the recipe in its header is invalid ({problems})") from None


def _pick(weights: dict[str, torch.Tensor], which: str, where: Path) -> dict[str, torch.Tensor]:
    """The raw weights, or the EMA's (`which="ema"`) with their prefix removed."""
    if which == "raw":
        return {k: v for k, v in weights.items() if not k.startswith(EMA_PREFIX)}
    ema = {k.removeprefix(EMA_PREFIX): v for k, v in weights.items() if k.startswith(EMA_PREFIX)}
    if not ema:
        raise CheckpointError(f"{where}: no EMA weights (the run had no train.ema_decay)")
    return ema


def _checkpoint_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA weights Accelerate saved in a checkpoint folder, under `ema/<name>`."""
    path = folder / _EMA_IN_CHECKPOINT
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{path}: unreadable, truncated or corrupt ({error_cause(exc)})"
        ) from None
    return {EMA_PREFIX + k.removeprefix("module."): v for k, v in state.items()}


def read_weights(
    path: str | Path, which: str = "raw"
) -> tuple[dict[str, torch.Tensor], Recipe, dict[str, Any]]:
    """`(state dict, recipe, facts)` of a model file, run folder or checkpoint folder; `which`
    is "raw" (the trained weights) or "ema" (their EMA, when the run kept one).

    `facts` holds `num_classes`, `class_names`, `has_decoder`, `mlflow_run_id` (also when the
    run reached MLflow only after the file was written) and `step`. Weights saved for another
    version of the architecture (`pipeline.models.versions`) are refused.
    """
    return _read_located(_locate(path), which)


def _locate(path: str | Path) -> Path:
    """The model file or checkpoint folder that `path` (a file, a run folder, a checkpoint
    folder or an MLflow run id) names."""
    from pipeline.runs.store import resolve_tracking_uri, run_folder

    p = run_folder(str(path), resolve_tracking_uri(), "--checkpoint") or Path(path)
    return p / FINAL_MODEL if p.is_dir() and (p / FINAL_MODEL).is_file() else p


def _read_located(p: Path, which: str) -> tuple[dict[str, torch.Tensor], Recipe, dict[str, Any]]:
    """`read_weights` of a model file or checkpoint folder `p` (from `_locate`)."""
    if which not in ("raw", "ema"):
        raise CheckpointError(f"--weights must be raw or ema, got {which!r}")
    if p.is_file():
        weights, header = _read_model_file(p)
        recipe = _header_recipe(header, p)
        header["mlflow_run_id"] = header.get("mlflow_run_id") or recorded_run_id(p.parent)
        check_architecture(recipe.model.name, header.get("architecture_version"), p)
        return _pick(weights, which, p), recipe, header
    if p.is_dir() and (p / STATE_FILE).is_file():
        state = read_state(p)
        run_id = state.mlflow_run_id or recorded_run_id(p.parent.parent)
        facts = {**read_meta(p), "mlflow_run_id": run_id, "step": state.step}
        try:
            recipe = load_recipe(p / RECIPE_FILE)
        except RecipeError as exc:  # one line: its problems joined
            raise CheckpointError("; ".join(x.strip() for x in str(exc).splitlines())) from None
        check_architecture(recipe.model.name, facts.get("architecture_version"), p)
        weights = {**checkpoint_weights(p), **_checkpoint_ema(p)}
        return _pick(weights, which, p), recipe, facts
    raise CheckpointError(f"{p}: no {FINAL_MODEL} and no checkpoint ({STATE_FILE}) there")


def load_model(
    path: str | Path, which: str = "raw"
) -> tuple[torch.nn.Module, Recipe, dict[str, Any]]:
    """Rebuild a trained model → `(model in eval mode, recipe, facts)`, with its raw or its EMA
    weights (`which`; see `read_weights`)."""
    from pipeline.models import build_model

    p = _locate(path)
    weights, recipe, facts = _read_located(p, which)
    in_file = p.is_file()
    described = "its header" if in_file else f"its {RECIPE_FILE} and {META_FILE}"
    try:
        num_classes, decoder = int(facts["num_classes"]), bool(facts["has_decoder"])
    except (KeyError, TypeError, ValueError) as exc:
        where = "its header" if in_file else META_FILE
        raise CheckpointError(
            f"{p}: no valid num_classes and has_decoder in {where} ({error_cause(exc)})"
        ) from None
    # The weights come from the file: no pretrained weights to fetch first.
    architecture = recipe.model.model_copy(update={"timm_pretrained": False})
    try:
        model = build_model(
            architecture,
            num_classes,
            autoencoder=decoder,
            embedding=facts.get("has_embedding", decoder),  # files from before f alone
        )
    except RecipeError as exc:
        problem = "; ".join(x.strip() for x in str(exc).splitlines())
        raise CheckpointError(
            f"{p}: the model {described} describes cannot be built ({problem})"
        ) from None
    misfit = _misfit(weights, model.state_dict())
    if misfit:
        count = f"{len(misfit)} weights do not" if len(misfit) > 1 else "1 weight does not"
        more = f"; and {len(misfit) - 3} more" if len(misfit) > 3 else ""
        raise CheckpointError(
            f"{p}: {count} fit the model {described} describes ({recipe.model.name}, "
            f"{num_classes} classes): " + "; ".join(misfit[:3]) + more
        )
    model.load_state_dict(weights)
    return model.eval(), recipe, facts


def _misfit(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """Each way `weights` do not fit a model's own state dict `own`, shapes first: a weight of
    another shape, one the file lacks, one the model lacks."""
    return [
        *(
            f"{k} is {list(v.shape)} in the file, {list(own[k].shape)} in the model"
            for k, v in weights.items()
            if k in own and v.shape != own[k].shape
        ),
        *(f"{k} is not in the file" for k in own if k not in weights),
        *(f"{k} is not in the model" for k in weights if k not in own),
    ]
