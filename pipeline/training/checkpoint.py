"""Checkpoints: Accelerate state folders written atomically, the newest found on resume, and the
final model file that evaluation and the tools load.

A checkpoint is `<output_dir>/checkpoints/step_XXXXXXXX/`. It is written under a `.tmp-` name and
renamed when complete, so any folder with the final name is whole: a job killed while saving
leaves only a temporary folder, which is ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Recipe, dump_recipe, load_recipe
from pipeline.errors import CheckpointError

STATE_FILE = "trainer_state.json"
META_FILE = "model_meta.json"
RECIPE_FILE = "recipe.yaml"
FINAL_MODEL = "model_final.pt"
_PREFIX = "step_"


@dataclass
class TrainerState:
    """Where a run stands: enough to continue it exactly."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    mlflow_run_id: str | None = None
    best_top1_err: float | None = None
    finished: bool = False


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder / STATE_FILE}: unreadable trainer state ({exc})") from exc


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    state: TrainerState,
    recipe: Recipe,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Save Accelerate state plus trainer state atomically; keep the newest `keep` folders.

    Every rank must call this (Accelerate saves per-rank RNG states); the main rank renames.
    """
    root = checkpoint_root(output_dir)
    final = root / f"{_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
        _write_json_atomic(tmp / META_FILE, meta)
        _write_json_atomic(tmp / STATE_FILE, asdict(state))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. epoch end after max_steps)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_model(
    path: Path,
    model: torch.nn.Module,
    recipe: Recipe,
    num_classes: int,
    class_names: list[str],
    state: TrainerState,
) -> None:
    """The trained model with what it takes to rebuild it (see docs/architecture.md)."""
    payload = {
        "recipe": recipe.model_dump(mode="json"),
        "num_classes": num_classes,
        "class_names": class_names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "mlflow_run_id": state.mlflow_run_id,
        "step": state.step,
    }
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_model(path: str | Path) -> tuple[torch.nn.Module, Recipe, dict[str, Any]]:
    """Rebuild a trained model from `model_final.pt`, a run folder, or a checkpoint folder.

    Returns `(model in eval mode, recipe, extra)` with `extra` holding `num_classes`,
    `class_names`, `mlflow_run_id` and `step`.
    """
    from pipeline.hooks import build_model_and_hook

    p = Path(path)
    if p.is_dir() and (p / FINAL_MODEL).is_file():
        p = p / FINAL_MODEL
    if p.is_file():
        try:
            payload = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{p}: not a model file this pipeline wrote ({exc})") from exc
        recipe = Recipe.model_validate(payload["recipe"])
        state_dict = payload["state_dict"]
        extra = {k: payload.get(k) for k in ("num_classes", "class_names", "mlflow_run_id", "step")}
    elif p.is_dir() and (p / STATE_FILE).is_file():
        recipe = load_recipe(p / RECIPE_FILE)
        state = read_state(p)
        meta = json.loads((p / META_FILE).read_text())
        state_dict = _accelerate_model_weights(p)
        extra = {**meta, "mlflow_run_id": state.mlflow_run_id, "step": state.step}
    else:
        raise CheckpointError(f"{p}: no {FINAL_MODEL} and no checkpoint ({STATE_FILE}) there")
    model, _ = build_model_and_hook(recipe, int(extra["num_classes"]))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: weights do not match the recipe's model {recipe.model.name!r} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), recipe, extra


def _accelerate_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights Accelerate saved, with the trainer's wrapper prefix removed."""
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        raw = load_file(str(st))
    else:
        raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    weights = {}
    for key, value in raw.items():
        for wrapper in ("_orig_mod.", "module."):  # torch.compile and DDP, if they were kept
            key = key.removeprefix(wrapper)
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = value
    return weights


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
