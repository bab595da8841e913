"""Checkpoints: Accelerate state folders written atomically, and the newest found on resume.

A checkpoint is `<output_dir>/checkpoints/step_XXXXXXXX/`. It is written under a `.tmp-` name and
renamed when complete, so any folder with the final name is whole: a job killed while saving
leaves only a temporary folder, which is ignored and cleaned up. A folder damaged later (a file
truncated or lost on the filesystem) is found on resume, which falls back to the newest one that
loads and renames the damaged one `damaged-step_XXXXXXXX`, outside the names searched here.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.errors import CheckpointError, StorageError
from pipeline.recipe import Recipe, dump_recipe
from pipeline.runs.distributed import any_rank

STATE_FILE = "trainer_state.json"
META_FILE = "model_meta.json"  # what it takes to rebuild the model (see model_file.py)
RECIPE_FILE = "recipe.yaml"
_PREFIX = "step_"
DAMAGED_PREFIX = "damaged-"  # a checkpoint set aside on resume: not a `step_*` folder


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


def checkpoint_before(output_dir: str | Path, step: int) -> Path | None:
    """The newest checkpoint saved before optimiser step `step` (its trainer state's step is
    lower), e.g. the last one a non-finite loss at `step` cannot have touched."""
    for folder in reversed(list_checkpoints(output_dir)):
        try:
            if read_state(folder).step < step:
                return folder
        except CheckpointError:
            continue
    return None


def state_files(accelerator) -> list[str]:
    """The files Accelerate's `load_state` needs in a checkpoint folder for what `accelerator`
    holds: models, optimisers, schedulers, registered objects (the EMA) and the gradient scaler.
    Its per-rank random states are optional to it (a resume on more ranks has none)."""
    from accelerate.utils.constants import (
        OPTIMIZER_NAME,
        SAFE_MODEL_NAME,
        SCALER_NAME,
        SCHEDULER_NAME,
    )

    def numbered(name: str, count: int, suffix: str) -> list[str]:
        return [f"{name}{f'_{i}' if i else ''}{suffix}" for i in range(count)]

    names = [
        *numbered(SAFE_MODEL_NAME, len(accelerator._models), ".safetensors"),
        *numbered(OPTIMIZER_NAME, len(accelerator._optimizers), ".bin"),
        *numbered(SCHEDULER_NAME, len(accelerator._schedulers), ".bin"),
        *(f"custom_checkpoint_{i}.pkl" for i in range(len(accelerator._custom_objects))),
    ]
    if accelerator.scaler is not None:
        names.append(SCALER_NAME)
    return names


def check_checkpoint(folder: Path, needed: Iterable[str]) -> None:
    """Raise CheckpointError naming the first file of `folder` that is missing (of `needed`) or
    unreadable: a safetensors file whose header does not cover the file, a torch file without
    its zip directory (which ends it: a truncated file has none), or the trainer's own JSON and
    YAML. Cheap: no tensor is read, so the ranks can all run it on a shared filesystem."""
    from safetensors import SafetensorError, safe_open

    for name in needed:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing")
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix in (".bin", ".pkl", ".pt"):
                zipfile.ZipFile(path).close()
            elif path.name == RECIPE_FILE:
                yaml.safe_load(path.read_text())
        except (OSError, SafetensorError, zipfile.BadZipFile, yaml.YAMLError) as exc:
            raise CheckpointError(
                f"{path}: unreadable, truncated or corrupt ({error_cause(exc)})"
            ) from None
    read_state(folder)
    read_meta(folder)


# What Accelerate's load_state raises on a file it cannot use (torch: RuntimeError).
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError)


def load_newest(
    accelerator,
    candidates: list[Path],
    check: Callable[[Path], None],
    output_dir: str | Path,
    say: Callable[[str], None],
) -> Path:
    """Load the first of `candidates` (newest first) whose files are whole (`check_checkpoint`)
    and that Accelerate loads; → that folder. `check` raises for one that is whole but may not
    be resumed (another recipe), which stops the resume.

    Each folder passed over is reported in one line (`say`), and one of this run's own
    (`output_dir`) is renamed `damaged-step_XXXXXXXX`: kept for a look, but no longer the newest
    checkpoint, which a later resume or the pruning of old ones would pick. The ranks judge the
    same files and agree on each folder (`any_rank`), so all load the same one; the main rank
    renames once all have loaded. None loads: CheckpointError naming each folder's cause.
    """
    from safetensors import SafetensorError

    needed = state_files(accelerator)
    own = checkpoint_root(output_dir).resolve()
    skipped: list[tuple[Path, str]] = []
    for folder in candidates:
        cause = None
        try:
            check_checkpoint(folder, needed)
        except CheckpointError as exc:
            cause = str(exc)
        else:
            check(folder)
            try:
                accelerator.load_state(str(folder))
            except (*_LOAD_ERRORS, SafetensorError) as exc:
                cause = f"{_culprit(folder)}: Accelerate could not load it ({error_cause(exc)})"
        if bool(any_rank(accelerator, torch.tensor(cause is not None))):
            skipped.append((folder, cause or f"{folder}: it did not load on another rank"))
            continue
        for bad, why in skipped:
            kept = ""
            if accelerator.is_main_process and bad.parent.resolve() == own:
                try:
                    kept = f"; the damaged folder is kept as {_set_aside(bad).name}"
                except OSError as exc:
                    kept = f"; it could not be renamed aside ({error_cause(exc)}): remove it"
            say(f"checkpoint {bad.name} skipped: {why}; resuming from {folder.name} instead{kept}")
        return folder
    raise CheckpointError(
        "cannot resume: no checkpoint loads (" + "; ".join(why for _, why in skipped) + ")"
    )


def _culprit(folder: Path) -> Path:
    """The first torch file of `folder` that does not load on its own, as `load_state` loads it
    (what it tripped on); the folder itself when each one does. Only after a failed load."""
    from accelerate.utils import load

    for path in sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pkl", ".pt")):
        try:
            custom = path.name.startswith("custom_checkpoint_")  # Accelerate unpickles these
            load(path, map_location="cpu", weights_only=not custom)
        except _LOAD_ERRORS:
            return path
    return folder


def _set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint `damaged-<name>` (`-2`, `-3`, … if taken); → the new path."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}-{n}")
    os.replace(folder, target)
    return target


def error_cause(exc: BaseException) -> str:
    """`Type: message` on one line, at most 300 characters: what safetensors or torch says of a
    file it cannot use (torch's state-dict errors put the detail on their second line)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text if len(text) <= 300 else text[:299] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
            follow_umask(*tmp.glob("*.safetensors"))  # the model weights, written 0600
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = folder / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{st}: missing (Accelerate writes the model weights there)")
    try:
        raw = load_file(str(st))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{st}: unreadable, truncated or corrupt ({error_cause(exc)})"
        ) from None
    weights = {}
    for key, value in raw.items():
        for wrapper in ("_orig_mod.", "module."):
            key = key.removeprefix(wrapper)
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = value
    return weights


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0o644 under 022, 0o640 under 027)."""
    try:  # Linux 4.7+: read it without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(*paths: Path) -> None:
    """Give files the mode the umask asks for: safetensors writes its files 0600, which on a
    shared filesystem hides a lab's models from the lab."""
    mode = file_mode()
    for path in paths:
        os.chmod(path, mode)


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
