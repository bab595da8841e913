"""When the run saves a checkpoint and what it resumes from.

Saves every `train.checkpoint_every` micro-batches (between optimiser steps, where no gradient
is pending, so a resume is exact), at each epoch's end (or, with `train.checkpoint_minutes`, once
that long has passed), on preemption and at the end; the newest `train.keep_checkpoints` stay.
`train.resume` names what to resume from: `auto` (the run's own newest that loads), `never`, a
checkpoint or run folder, or an MLflow run id (its recorded folder).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.errors import CheckpointError
from pipeline.models.versions import check_architecture
from pipeline.recipe import Recipe
from pipeline.runs.checkpoints import (
    RECIPE_FILE,
    TrainerState,
    list_checkpoints,
    load_newest,
    read_meta,
    read_state,
    save_checkpoint,
)
from pipeline.runs.distributed import any_rank
from pipeline.runs.resume_check import check_resumable
from pipeline.runs.store import resolve_tracking_uri, run_folder
from pipeline.training.clock import Clock
from pipeline.training.step import MicroBatch


class Checkpointer:
    """Saves the run's state (model, optimiser, EMA, RNGs via Accelerate) and finds it again."""

    def __init__(
        self, accelerator, recipe: Recipe, output_dir: Path, facts: Callable[[], dict]
    ) -> None:
        self.accelerator, self.recipe, self.output_dir = accelerator, recipe, output_dir
        self.facts = facts  # the model's facts, recorded beside its weights
        cfg = recipe.train
        self.every, self.minutes, self.keep = (
            cfg.checkpoint_every,
            cfg.checkpoint_minutes,
            cfg.keep_checkpoints,
        )
        self.last_saved = time.monotonic()

    def due_after(self, clock: Clock, micro: MicroBatch) -> bool:
        """After an optimiser step: whether it crossed a multiple of `train.checkpoint_every`."""
        return micro.last and clock.crossed(self.every, micro)

    def due_at_epoch_end(self) -> bool:
        """Always, or with `train.checkpoint_minutes` once that long has passed since the last
        save (on any rank: the ranks decide together)."""
        if self.minutes is None:
            return True
        late = time.monotonic() - self.last_saved >= 60.0 * self.minutes
        return bool(any_rank(self.accelerator, torch.tensor([late]))[0])

    def save(self, state: TrainerState, mlflow_run_id: str | None) -> None:
        """A checkpoint of `state` (its MLflow run recorded, once known)."""
        self.last_saved = time.monotonic()
        state.mlflow_run_id = mlflow_run_id or state.mlflow_run_id
        save_checkpoint(
            self.accelerator, self.output_dir, state, self.recipe, self.facts(), self.keep
        )

    def resume(self, say: Callable[[str], None]) -> TrainerState | None:
        """Load the checkpoint `train.resume` names (of a run's, the newest one that loads; a
        damaged newer one is reported and set aside) and return its state; None: a new run."""
        candidates = self._candidates()
        if not candidates:
            return None

        def resumable(folder: Path) -> None:
            check_resumable(self.recipe, folder / RECIPE_FILE)
            saved = read_meta(folder).get("architecture_version")
            check_architecture(self.recipe.model.name, saved, folder)

        folder = load_newest(self.accelerator, candidates, resumable, self.output_dir, say)
        state = read_state(folder)
        say(f"resumed from {folder} (epoch {state.epoch}, step {state.step})")
        return state

    def _candidates(self) -> list[Path]:
        """Checkpoint folders to try, newest first."""
        mode = self.recipe.train.resume
        if mode == "never":
            return []
        if mode == "auto":
            return list_checkpoints(self.output_dir)[::-1]
        tracking = self.recipe.tracking  # a checkpoint folder, a run folder, or an MLflow run id
        uri = resolve_tracking_uri(tracking.tracking_uri)
        target = (tracking.enabled and run_folder(mode, uri, "train.resume")) or Path(mode)
        is_one = (target / RECIPE_FILE).is_file()
        candidates = [target] if is_one else list_checkpoints(target)[::-1]
        if not candidates:
            raise CheckpointError(f"train.resume: no checkpoint in or at {target}")
        return candidates
