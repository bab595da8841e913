"""Checkpoints: Accelerate state folders written atomically, and the newest found on resume.

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

from pipeline.errors import CheckpointError, StorageError
from pipeline.recipe import Recipe, dump_recipe
from pipeline.runs.distributed import any_rank

STATE_FILE = "trainer_state.json"
META_FILE = "model_meta.json"  # what it takes to rebuild the model (see model_file.py)
RECIPE_FILE = "recipe.yaml"
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
    from safetensors import SafetensorError

    failure: Exception | None = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
            _write_json_atomic(tmp / META_FILE, meta)
            _write_json_atomic(tmp / STATE_FILE, asdict(state))
            _fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch: RuntimeError
        failure = exc
    if bool(any_rank(accelerator, torch.tensor(failure is not None))):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(f"checkpoint {final}", root, _state_bytes(accelerator), failure)
    if accelerator.is_main_process:
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


def _state_bytes(accelerator) -> int:
    """Bytes of the model and optimiser state a checkpoint holds (what one needs on disk)."""
    total = 0
    for part in (*accelerator._models, *accelerator._optimizers):
        stack = [part.state_dict()]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
    return total


def storage_error(
    what: str, folder: Path, needed: int, cause: BaseException | None
) -> StorageError:
    """One line: what could not be written, why, how much it needed and how much is free."""
    if cause is None:  # this rank wrote its part; another one could not
        reason = "the write failed on another rank"
    else:
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        reason = reason.splitlines()[0] if reason else type(cause).__name__
    try:
        space = shutil.disk_usage(folder).free
        free = f"{space / 2**20:.1f} MiB free there"
    except OSError:
        space, free = None, "free space unknown"
    if (
        cause is not None
        and not isinstance(cause, OSError)
        and space is not None
        and space < needed
    ):
        # torch and safetensors report a full disk in their own words (e.g. "enforce fail at
        # inline_container.cc"); the free space says what happened
        reason = f"no space left on the device; {type(cause).__name__}: {reason[:120]}"
    return StorageError(
        f"{what}: could not be written ({reason}); it needs about {needed / 2**20:.1f} MiB, "
        f"{free}. Nothing partial is left and the earlier checkpoints are kept: free space "
        "(or fix the permission or quota) and run the same command to resume"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    """The model facts a checkpoint folder was saved with (`num_classes`, `has_decoder`, ...)."""
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: unreadable model facts ({exc})") from exc


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights Accelerate saved in `folder`, with the trainer's wrapper prefixes
    (`model.` of the method runner, and `_orig_mod.`/`module.` if torch.compile or DDP kept
    theirs) removed."""
    from safetensors.torch import load_file

    st = folder / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{st}: missing (Accelerate writes the model weights there)")
    raw = load_file(str(st))
    weights = {}
    for key, value in raw.items():
        for wrapper in ("_orig_mod.", "module."):
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
