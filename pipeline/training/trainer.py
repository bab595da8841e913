"""The trainer: a loop over the run's clock that calls its components, each owning one policy:
the step (step.py), the metric window (logging, the non-finite check), the checkpointer, the
validator, preemption, progress and tracking. build.py builds what they work on.

It knows no method by name: the method turns a batch into a loss, and declares what it needs
from the model. The loop avoids host-device syncs except at logging, checkpoint and
preemption-check steps.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import weakref
from pathlib import Path

import torch

from pipeline.errors import CollectiveTimeout, PipelineError
from pipeline.recipe import Recipe, dump_recipe
from pipeline.runs.distributed import all_hosts
from pipeline.runs.journal import read_run
from pipeline.runs.model_file import FINAL_MODEL, model_facts, save_final_model
from pipeline.runs.run_lock import RunLock
from pipeline.runs.tracking import NewRun, Tracker
from pipeline.training.build import build_run, make_accelerator
from pipeline.training.checkpointer import Checkpointer
from pipeline.training.clock import Clock
from pipeline.training.curves import plot_curves
from pipeline.training.metric_window import MetricWindow, Timing
from pipeline.training.preempt import PreemptionWatch
from pipeline.training.progress import RunProgress, progress_mode
from pipeline.training.step import MicroBatch, StepOutput, step_generator, train_step
from pipeline.training.summary import RunSummary
from pipeline.training.validator import Validator, ValResult


class Trainer:
    """Builds a recipe's run (build.py) and its components; `fit()` trains it."""

    def __init__(self, recipe: Recipe) -> None:
        if recipe.train.output_dir is None:
            recipe = recipe.model_copy(deep=True)
            recipe.train.output_dir = f"runs/{recipe.name}"
        self.recipe = recipe
        self.output_dir = Path(recipe.train.output_dir)
        self.accelerator = make_accelerator(recipe)
        self.lock = _lock_run_folder(self.accelerator, self.output_dir)
        self._release = weakref.finalize(self, self.lock.release) if self.lock else None
        try:
            self.parts = build_run(recipe, self.accelerator, self.output_dir / "data_index")
            self._components()
        except BaseException as exc:
            self.close()
            failure = _collective_failure(exc, self.accelerator, self.output_dir)
            if failure is None:
                raise
            raise failure from exc

    def _components(self) -> None:
        """The policies around the step, each with its own settings and state."""
        recipe, acc, parts = self.recipe, self.accelerator, self.parts
        self.tracker = Tracker(recipe.tracking, self.output_dir, enabled=acc.is_main_process)
        self.watch = PreemptionWatch(self.output_dir)
        self.checkpointer = Checkpointer(acc, recipe, self.output_dir, self._facts)
        self.validator = Validator(
            acc,
            parts.loaders.val,
            parts.num_classes,
            recipe.model.channels_last,
            recipe.train.eval_every,
            parts.ema,
        )
        self.images_per_step = recipe.data.batch_size * acc.num_processes
        self.log_every = recipe.train.log_every
        self.preempt_every = recipe.train.preempt_check_every
        self.seed = recipe.train.seed
        self.last_val = ValResult()  # the latest validation, for the summary
        self.timing: Timing | None = None  # the latest logged speed, for the summary

    def close(self) -> None:
        """Free the run folder for another training (fit() does this when it ends)."""
        if self._release is not None:
            self._release()

    @property
    def clock(self) -> Clock:
        return self.parts.clock

    # ------------------------------------------------------------------- loop
    def fit(self) -> RunSummary:
        """Train until the recipe's epochs or max_steps, or until preempted; then free the run
        folder. A collective that fails (a rank hung or lost) ends it with CollectiveTimeout."""
        try:
            return self._fit(time.perf_counter())
        except BaseException as exc:
            failure = _collective_failure(exc, self.accelerator, self.output_dir)
            if failure is None:
                raise
            raise failure from exc
        finally:
            self.close()

    def _fit(self, started: float) -> RunSummary:
        self._print(self.tracker.where())
        self._resume()
        if self.clock.state.finished:
            return self._already_finished(started)
        self._start_tracking()
        try:
            with self.watch:
                preempted = self._train()
        except BaseException as exc:
            failure = _collective_failure(exc, self.accelerator, self.output_dir) or exc
            self.tracker.end("FAILED", str(failure) if isinstance(failure, PipelineError) else None)
            raise
        if preempted:
            with self.watch:  # a second SIGTERM (another scancel) must not cut the save short
                self._checkpoint()
            if self.accelerator.is_main_process:
                self.watch.clear()
            self.tracker.end("KILLED")
            self._print(f"preempted at step {self.clock.state.step}: checkpoint saved, exiting")
            return self._summary(started, preempted=True)
        self.clock.state.finished = True
        with self.watch:
            self._checkpoint()
        self._finish()
        summary = self._summary(started)
        self.tracker.log(_final_metrics(summary), self.clock.state.step)
        self.tracker.end("FINISHED")
        return summary

    def _train(self) -> bool:
        """The loop: epochs of steps until the run's end; whether it stopped for preemption."""
        clock, parts = self.clock, self.parts
        progress = self._progress()
        window = MetricWindow(
            self.accelerator, self.tracker, progress, self.images_per_step, self.output_dir,
            parts.method.name,
        )  # fmt: skip
        while not clock.done:
            parts.loaders.train.set_epoch(clock.state.epoch, start_step=clock.state.step_in_epoch)
            progress.start_epoch(
                clock.state.epoch, clock.steps_left_in_epoch(), time.perf_counter()
            )
            window.restart(clock.state.step)
            for images, labels in parts.loaders.train:
                micro = clock.micro_batch()
                parts.set_lr(clock.lr_index())
                window.add(self._step(images, labels, micro))
                clock.tick()
                progress.step(clock.state.step, time.perf_counter())
                if clock.state.step % self.log_every == 0:
                    window.log(clock, self._lr())
                if self.checkpointer.due_after(clock, micro):
                    window.check_finite(clock)
                    self._checkpoint()
                if self._preemption_requested(micro):
                    window.check_finite(clock)
                    progress.close()
                    self.timing = window.last
                    return True
                if clock.done or clock.epoch_done:
                    break
            window.log(clock, self._lr())
            progress.end_epoch(time.perf_counter())
            self.timing = window.last
            self._end_epoch()
        return False

    def _step(self, images: torch.Tensor, labels: torch.Tensor, micro: MicroBatch) -> StepOutput:
        """One micro-batch: the method's loss, backward, and the optimiser step on the last."""
        parts = self.parts
        out = train_step(
            self.accelerator,
            parts.runner,
            parts.optimizer,
            images,
            labels,
            step_generator(self.seed, self.clock.state.step),  # per micro-batch
            parts.settings,
            micro,
        )
        if parts.ema is not None and micro.last:
            parts.ema.update(parts.model)
        return out

    def _preemption_requested(self, micro: MicroBatch) -> bool:
        """Checked between optimiser steps only (no gradient pending: the resume is exact)."""
        if not (micro.last and self.clock.crossed(self.preempt_every, micro)):
            return False
        return self.watch.requested(self.accelerator)

    def _end_epoch(self) -> None:
        """After an epoch's batches (or the run's last): validate and checkpoint when due."""
        clock = self.clock
        rolled = clock.roll_epoch()
        if self.validator.due(clock.state, rolled, clock.done):
            self._validate()
        if rolled and not clock.done and self.checkpointer.due_at_epoch_end():
            self._checkpoint()

    def _progress(self) -> RunProgress:
        """The console's view of the run (main process): a bar on a terminal, else lines."""
        cfg = self.recipe.train
        return RunProgress(
            self.recipe.name,
            self.clock.total_steps,
            self.clock.steps_per_epoch,
            self.images_per_step,
            cfg.log_seconds,
            progress_mode(self.accelerator.is_main_process and cfg.progress),
            time.perf_counter(),
            write=self._print,
        )

    def _lr(self) -> float:
        return self.parts.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------ start and results
    def _resume(self) -> None:
        """The state of the checkpoint `train.resume` names, if any; a finished run whose
        epochs or max_steps were raised trains on."""
        state = self.checkpointer.resume(self._print)
        if state is None:
            return
        self.clock.state = state
        if state.finished and state.step < self.clock.total_steps:
            state.finished = False
            self._print(f"extending the finished run from step {state.step} to "
                        f"{self.clock.total_steps}")  # fmt: skip

    def _already_finished(self, started: float) -> RunSummary:
        """A finished run started again: deliver what tracking still holds, show its results."""
        self._print(f"run in {self.output_dir} already finished; nothing to do")
        self.tracker.deliver_leftovers()
        self.last_val, self.timing = _recorded_results(self.tracker.folder)
        return self._summary(started)

    def _start_tracking(self) -> None:
        """Open the run's journal (every rank names its host), note skipped files."""
        recipe, acc, parts = self.recipe, self.accelerator, self.parts
        facts = {"num_params": parts.num_params, "world_size": acc.num_processes}
        facts |= {"lr_scaled": parts.base_lr, "steps_per_epoch": self.clock.steps_per_epoch}
        self.tracker.start(
            NewRun(
                name=recipe.name,
                params={**recipe.flat(), **facts},
                recipe_yaml=dump_recipe(recipe),
                tags={"method": recipe.method.name, "model": recipe.model.name},
                hosts=all_hosts(acc),
            )
        )
        if parts.loaders.skipped:
            self.tracker.log({"data/skipped_files": float(len(parts.loaders.skipped))}, 0)

    def _validate(self) -> None:
        model = self.accelerator.unwrap_model(self.parts.runner).model
        self.last_val = self.validator.run(model, self.clock.state)
        self.tracker.log(self.last_val.metrics(), self.clock.state.epoch)
        self._print(self.last_val.line(self.clock.state.epoch))

    def _facts(self) -> dict:
        parts = self.parts
        return model_facts(parts.model, parts.num_classes, parts.loaders.class_names)

    def _checkpoint(self) -> None:
        self.checkpointer.save(self.clock.state, self.tracker.run_id)

    def _finish(self) -> None:
        """The model file and the curves (main process)."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.parts.runner).model
        ema = self.parts.ema.module if self.parts.ema is not None else None
        final = self.output_dir / FINAL_MODEL
        save_final_model(final, model, self.recipe, self._facts(), self.clock.state, ema)
        title = f"{self.recipe.name} ({self.recipe.method.name})"
        curves = plot_curves(self.tracker, self.output_dir / "curves.png", title)
        if curves is not None:
            self.tracker.artifact(curves)

    def _summary(self, started: float, preempted: bool = False) -> RunSummary:
        state, timing = self.clock.state, self.timing
        return RunSummary(
            name=self.recipe.name,
            method=self.recipe.method.name,
            params=self.parts.num_params,
            steps=state.step,
            epochs_done=self.clock.epochs_done,
            top1_err=self.last_val.top1_err,
            top5_err=self.last_val.top5_err,
            best_top1_err=state.best_top1_err,
            msec_per_batch=timing.msec_per_batch if timing else None,
            images_per_s=timing.images_per_s if timing else None,
            wall_s=time.perf_counter() - started,
            mlflow_run_id=self.tracker.run_id or state.mlflow_run_id,
            output_dir=str(self.output_dir),
            preempted=preempted,
            skipped_files=list(self.parts.loaders.skipped),
        )

    def _print(self, text: str) -> None:
        """Print once per job (the global main rank), not once per node."""
        if self.accelerator.is_main_process:
            print(text, flush=True)


def _final_metrics(summary: RunSummary) -> dict[str, float]:
    values = {
        "final/top1_err": summary.top1_err,
        "final/top5_err": summary.top5_err,
        "final/best_top1_err": summary.best_top1_err,
    }
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def _recorded_results(folder: Path) -> tuple[ValResult, Timing | None]:
    """A finished run's errors and speed as its journal (`folder`, its tracking folder) last
    recorded them; None for what it did not record."""
    try:
        metrics = read_run(folder).metrics
    except ValueError:  # no journal, or no start in it
        return ValResult(), None
    top1, top5 = (
        metrics.get(f"final/{key}", metrics.get(f"val/{key}")) for key in ("top1_err", "top5_err")
    )
    msec, ips = metrics.get("perf/msec_per_batch"), metrics.get("perf/images_per_s")
    return ValResult(top1, top5), (None if msec is None or ips is None else Timing(msec, ips))


# Marker for slurm/launch.sh: a rank stopped answering, so requeue (torchrun reports exit 5 as 1).
RANK_LOST_FILE = "RANK_LOST"


def _lock_run_folder(accelerator, folder: Path) -> RunLock | None:
    """The main process takes the run folder's lock (after checking it can write there); every
    rank stops with the same exit status if it cannot."""
    lock, failure = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(folder)
        except PipelineError as exc:
            failure = exc
    status = torch.tensor(float(failure.exit_status if failure else 0))
    if accelerator.num_processes > 1:
        status = status.to(accelerator.device)
        torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if status > 0:
        error = PipelineError(
            f"rank {accelerator.process_index}: stopped with rank 0 (see its error)"
        )
        error.exit_status = int(status)
        raise error
    return lock


def _collective_failure(exc: BaseException, accelerator, folder: Path) -> CollectiveTimeout | None:
    """A CollectiveTimeout if `exc` is a failed collective (NCCL's DistError, gloo's timeout or
    closed connection), after leaving RANK_LOST in the run folder for the launcher; else None."""
    if accelerator.num_processes == 1 or isinstance(exc, PipelineError):
        return None
    text = str(exc)
    gloo = isinstance(exc, RuntimeError) and "gloo" in text
    if not (isinstance(exc, torch.distributed.DistError) or gloo):
        return None
    lines = text.strip().splitlines()
    # gloo prefixes its source location: "[…/unbound_buffer.cc:78] Timed out waiting …"
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])[:300] if lines else type(exc).__name__
    rank = accelerator.process_index
    message = (
        f"rank {rank}: a collective with the other ranks failed ({first}); a rank hung, died or "
        f"lost its network (see train.collective_timeout_minutes). Exit 5: slurm/launch.sh "
        f"requeues the job, which resumes from the last checkpoint"
    )
    with contextlib.suppress(OSError):  # the exit status still tells a one-process launcher
        (folder / RANK_LOST_FILE).write_text(message + "\n")
    return CollectiveTimeout(message)
