"""The trainer: Accelerate (DDP, AMP), a mixing method, checkpoints, MLflow.

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
from datetime import timedelta
from pathlib import Path

import torch

from pipeline.errors import (
    CheckpointError,
    CollectiveTimeout,
    PipelineError,
    RecipeError,
    TrainingError,
)
from pipeline.evaluation.metrics import TopKErrors
from pipeline.methods import build_method, method_class
from pipeline.models import MixNet, count_parameters
from pipeline.models.versions import check_architecture
from pipeline.recipe import Recipe
from pipeline.runs.checkpoints import (
    RECIPE_FILE,
    TrainerState,
    checkpoint_before,
    list_checkpoints,
    load_newest,
    read_meta,
    read_state,
    save_checkpoint,
)
from pipeline.runs.distributed import all_hosts, any_rank
from pipeline.runs.journal import read_run
from pipeline.runs.model_file import FINAL_MODEL, model_facts, read_weights, save_final_model
from pipeline.runs.resume_check import check_resumable
from pipeline.runs.run_lock import RunLock
from pipeline.runs.store import run_folder
from pipeline.runs.tracking import Tracker, resolve_tracking_uri
from pipeline.training.curves import plot_curves
from pipeline.training.optim import build_optimizer, build_schedule, scaled_lr
from pipeline.training.preempt import PreemptionWatch
from pipeline.training.progress import RunProgress, progress_mode
from pipeline.training.step import MethodRunner, step_generator, train_step
from pipeline.training.summary import RunSummary


class Trainer:
    """Builds everything a recipe asks for; `fit()` trains, validates, checkpoints and logs."""

    def __init__(self, recipe: Recipe) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        if recipe.train.output_dir is None:
            recipe = recipe.model_copy(deep=True)
            recipe.train.output_dir = f"runs/{recipe.name}"
        self.recipe = recipe
        cfg = recipe.train
        self.output_dir = Path(cfg.output_dir)
        unused = method_class(recipe.method.name).unused_parameters
        handlers = [
            DistributedDataParallelKwargs(find_unused_parameters=bool(unused)),
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.collective_timeout_minutes)),
        ]
        self.accelerator = Accelerator(
            mixed_precision=cfg.amp, cpu=cfg.cpu, kwargs_handlers=handlers
        )
        self.lock = _lock_run_folder(self.accelerator, self.output_dir)
        self._release = weakref.finalize(self, self.lock.release) if self.lock else None
        try:
            self._build()
        except BaseException as exc:
            self.close()
            failure = _collective_failure(exc, self.accelerator, self.output_dir)
            if failure is None:
                raise
            raise failure from exc

    def _build(self) -> None:
        """Data, model, method, optimiser, schedule, EMA and tracker, as the recipe says."""
        from accelerate.utils import set_seed

        from pipeline.data import build_loaders

        recipe, cfg, acc = self.recipe, self.recipe.train, self.accelerator
        method = build_method(recipe.method, recipe.optim.label_smoothing, acc.process_index)
        set_seed(cfg.seed, device_specific=False)
        self.loaders = build_loaders(
            recipe.data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=acc.device,
            seed=cfg.seed,
            index_fallback_dir=self.output_dir / "data_index",
        )
        self.num_classes = recipe.model.num_classes or self.loaders.num_classes
        model = method.build_model(recipe.model, self.num_classes)
        if recipe.model.pretrained:
            _load_pretrained(model, recipe.model.pretrained)
        if recipe.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.method = method
        self.num_params = count_parameters(model)
        runner = MethodRunner(model, method)

        self.steps_per_epoch = len(self.loaders.train)  # loader batches (micro-batches)
        self.accum = _accumulation(cfg, recipe.data.batch_size * acc.num_processes)
        # optimiser steps per epoch: the last one of an epoch may have fewer micro-batches
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / self.accum)
        global_batch = recipe.data.batch_size * acc.num_processes * self.accum
        self.base_lr = scaled_lr(recipe.optim, global_batch)
        optimizer = build_optimizer(recipe.optim, model, self.base_lr)
        self.runner, self.optimizer = acc.prepare(runner, optimizer)
        self.ema = None
        if cfg.ema_decay is not None:  # a copy on the model's device, saved in checkpoints
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
            acc.register_for_checkpointing(self.ema)
        if recipe.model.compile:  # after the EMA's copy, which stays eager
            model.compile_parts()
        self.set_lr = build_schedule(
            recipe.optim, self.optimizer, self.base_lr, cfg.epochs, self.updates_per_epoch
        )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.state = TrainerState()
        self.last_val: tuple[float | None, float | None] = (None, None)  # top-1, top-5 error
        self.tracker = Tracker(recipe, self.output_dir, enabled=acc.is_main_process)
        self.watch = PreemptionWatch(self.output_dir)
        self.last_checkpoint = time.monotonic()  # for train.checkpoint_minutes

    def close(self) -> None:
        """Free the run folder for another training (fit() does this when it ends)."""
        if self._release is not None:
            self._release()

    # ----------------------------------------------------------------- resume
    def _resume(self) -> None:
        """Load the checkpoint `train.resume` names; of a run's, the newest one that loads (a
        damaged newer one is reported and set aside: `load_newest`)."""
        mode = self.recipe.train.resume
        if mode == "never":
            return
        if mode == "auto":
            candidates = list_checkpoints(self.output_dir)[::-1]
            if not candidates:
                return  # a new run
        else:  # a checkpoint folder, a run folder (its checkpoints), or an MLflow run id
            tracking = self.recipe.tracking
            uri = resolve_tracking_uri(tracking.tracking_uri)
            target = (tracking.enabled and run_folder(mode, uri, "train.resume")) or Path(mode)
            is_one = (target / RECIPE_FILE).is_file()
            candidates = [target] if is_one else list_checkpoints(target)[::-1]
            if not candidates:
                raise CheckpointError(f"train.resume: no checkpoint in or at {target}")

        def resumable(folder: Path) -> None:
            check_resumable(self.recipe, folder / RECIPE_FILE)
            saved = read_meta(folder).get("architecture_version")
            check_architecture(self.recipe.model.name, saved, folder)

        folder = load_newest(self.accelerator, candidates, resumable, self.output_dir, self._print)
        self.state = read_state(folder)
        self._print(f"resumed from {folder} (epoch {self.state.epoch}, step {self.state.step})")

    # ------------------------------------------------------------------- loop
    def fit(self) -> RunSummary:
        """Train until the recipe's epochs or max_steps, or until preempted; then free the run
        folder. A collective that fails (a rank hung or lost) ends it with CollectiveTimeout."""
        try:
            return self._fit()
        except BaseException as exc:
            failure = _collective_failure(exc, self.accelerator, self.output_dir)
            if failure is None:
                raise
            raise failure from exc
        finally:
            self.close()

    def _fit(self) -> RunSummary:
        acc = self.accelerator
        started = time.perf_counter()
        self._print(self.tracker.where())
        self._resume()
        if self.state.finished and self.state.step < self.total_steps:
            self.state.finished = False  # train.epochs or max_steps raised: train on
            self._print(f"extending the finished run from step {self.state.step} to "
                        f"{self.total_steps}")  # fmt: skip
        if self.state.finished:
            self._print(f"run in {self.output_dir} already finished; nothing to do")
            self.tracker.deliver_leftovers()
            self.last_val, timing = _recorded_results(self.tracker.folder)
            return self._summary(started, timing)
        self.tracker.start(
            {
                "num_params": self.num_params,
                "world_size": acc.num_processes,
                "lr_scaled": self.base_lr,
                "steps_per_epoch": self.steps_per_epoch,
            },
            hosts=all_hosts(acc),
        )
        if self.loaders.skipped:
            self.tracker.log({"data/skipped_files": float(len(self.loaders.skipped))}, 0)
        try:
            with self.watch:
                timing, preempted = self._train_epochs()
        except BaseException as exc:
            failure = _collective_failure(exc, acc, self.output_dir) or exc
            self.tracker.end("FAILED", str(failure) if isinstance(failure, PipelineError) else None)
            raise
        if preempted:
            with self.watch:  # a second SIGTERM (another scancel) must not cut the save short
                self._checkpoint()
            if acc.is_main_process:
                self.watch.clear()
            self.tracker.end("KILLED")
            self._print(f"preempted at step {self.state.step}: checkpoint saved, exiting")
            return self._summary(started, timing, preempted=True)
        self.state.finished = True
        with self.watch:
            self._checkpoint()
        self._finish()
        summary = self._summary(started, timing)
        self.tracker.log(_final_metrics(summary), self.state.step)
        self.tracker.end("FINISHED")
        return summary

    def _train_epochs(self) -> tuple[tuple[float, float] | None, bool]:
        acc, cfg = self.accelerator, self.recipe.train
        timing: tuple[float, float] | None = None
        progress = RunProgress(
            self.recipe.name,
            self.total_steps,
            self.steps_per_epoch,
            self.recipe.data.batch_size * acc.num_processes,
            cfg.log_seconds,
            progress_mode(acc.is_main_process and cfg.progress),
            time.perf_counter(),
            write=self._print,
        )
        while self.state.step < self.total_steps:
            loader = self.loaders.train
            loader.set_epoch(self.state.epoch, start_step=self.state.step_in_epoch)
            remaining = min(
                self.steps_per_epoch - self.state.step_in_epoch, self.total_steps - self.state.step
            )
            progress.start_epoch(self.state.epoch, remaining, time.perf_counter())
            window = _Window(self.state.step)
            for images, labels in loader:
                micro_batches, last_micro = self._accumulation_window()
                self.set_lr(
                    self.state.epoch * self.updates_per_epoch
                    + self.state.step_in_epoch // self.accum
                )
                window.add(
                    train_step(
                        acc,
                        self.runner,
                        self.optimizer,
                        images,
                        labels,
                        step_generator(cfg.seed, self.state.step),  # per micro-batch
                        self.recipe.optim.grad_clip,
                        self.recipe.model.channels_last,
                        micro_batches,
                        last_micro,
                    )
                )
                if self.ema is not None and last_micro:
                    self.ema.update(self.model)
                self.state.step += 1
                self.state.step_in_epoch += 1
                progress.step(self.state.step, time.perf_counter())
                if self.state.step % cfg.log_every == 0:
                    timing = self._log_window(window, progress) or timing
                    window = _Window(self.state.step)
                # Checkpoints and preemption only between optimiser steps, where no gradient
                # is pending: a resume from there is exact.
                if last_micro and self._crossed(cfg.checkpoint_every, micro_batches):
                    self._check_finite(window)
                    self._checkpoint()
                if (
                    last_micro
                    and self._crossed(cfg.preempt_check_every, micro_batches)
                    and self.watch.requested(acc)
                ):
                    self._check_finite(window)
                    progress.close()
                    return timing, True
                if (
                    self.state.step >= self.total_steps
                    or self.state.step_in_epoch >= self.steps_per_epoch
                ):
                    break
            timing = self._log_window(window, progress) or timing
            progress.end_epoch(time.perf_counter())
            epoch_done = self.state.step_in_epoch >= self.steps_per_epoch
            if epoch_done:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
            last = self.state.step >= self.total_steps
            if (epoch_done and self.state.epoch % cfg.eval_every == 0) or last:
                self._validate()
            if epoch_done and not last and self._epoch_checkpoint_due():
                self._checkpoint()
        return timing, False

    def _epoch_checkpoint_due(self) -> bool:
        """At an epoch's end: always, or with `train.checkpoint_minutes` once that long has
        passed since the last checkpoint (on any rank: the ranks decide together)."""
        minutes = self.recipe.train.checkpoint_minutes
        if minutes is None:
            return True
        late = time.monotonic() - self.last_checkpoint >= 60.0 * minutes
        return bool(any_rank(self.accelerator, torch.tensor([late]))[0])

    def _accumulation_window(self) -> tuple[int, bool]:
        """(micro-batches in the current optimiser step, whether this batch is its last). A
        step never spans an epoch end or the run's end: the last one may be shorter, and its
        loss is then the mean over the micro-batches it has."""
        first = self.state.step_in_epoch // self.accum * self.accum  # in this epoch
        run_left = self.total_steps - (self.state.step - (self.state.step_in_epoch - first))
        size = min(self.accum, self.steps_per_epoch - first, run_left)
        return size, self.state.step_in_epoch + 1 - first == size

    def _crossed(self, every: int, micro_batches: int) -> bool:
        """Whether the optimiser step just ended passed a multiple of `every` micro-batches
        (with one micro-batch per step: step % every == 0)."""
        return self.state.step // every > (self.state.step - micro_batches) // every

    # --------------------------------------------------------------- logging
    def _log_window(self, window: _Window, progress: RunProgress) -> tuple[float, float] | None:
        """Log the mean loss and speed of the steps since the last log; sync once here. At the
        global step, with `train/epoch` (step / steps per epoch): val/* are logged per epoch."""
        if not window.losses:
            return None
        self._check_finite(window)
        losses = torch.stack(window.losses)
        mean_loss = float(self.accelerator.reduce(losses.mean(), reduction="mean"))
        elapsed = time.perf_counter() - window.started
        n = len(window.losses)
        msec = 1e3 * elapsed / n
        ips = n * self.recipe.data.batch_size * self.accelerator.num_processes / elapsed
        lr = self.optimizer.param_groups[0]["lr"]
        self.tracker.log(
            {
                "train/loss": mean_loss,
                "train/lr": lr,
                "train/epoch": self.state.step / self.steps_per_epoch,
                "perf/msec_per_batch": msec,
                "perf/images_per_s": ips,
                **window.stat_means(),
            },
            self.state.step,
        )
        progress.note(mean_loss, lr)
        return msec, ips

    def _check_finite(self, window: _Window) -> None:
        """Stop with the first non-finite step, naming the newest checkpoint saved before it (not
        simply the newest: one a resume from an older checkpoint left may be from after it)."""
        if not window.losses:
            return
        losses = torch.stack(window.losses)
        bad = any_rank(self.accelerator, ~torch.isfinite(losses))
        if bool(bad.any()):
            first = window.first_step + int(bad.nonzero()[0]) + 1
            last = checkpoint_before(self.output_dir, first)
            keep = f"last good checkpoint: {last}" if last else "no checkpoint was saved before it"
            raise TrainingError(
                f"non-finite loss ({float(losses[bad.nonzero()[0]])}) at step {first} "
                f"(epoch {self.state.epoch}, method {self.recipe.method.name}); {keep}"
            )

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def _errors(self, model: torch.nn.Module) -> tuple[float, float]:
        """Top-1 and top-5 error (%) of `model` on the val split."""
        acc = self.accelerator
        model.eval()
        errors = TopKErrors(self.num_classes, (1, 5), acc.device)
        for images, labels in self.loaders.val:
            if self.recipe.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                errors.update(model(images).float(), labels)
        found = errors.compute()
        return found[1], found[5]

    def _validate(self) -> None:
        top1, top5 = self._errors(self.accelerator.unwrap_model(self.runner).model)
        best = top1 if self.state.best_top1_err is None else min(top1, self.state.best_top1_err)
        self.state.best_top1_err = best
        self.last_val = (top1, top5)
        metrics = {"val/top1_err": top1, "val/top5_err": top5, "val/best_top1_err": best}
        line = f"epoch {self.state.epoch}: val top-1 err {top1:.2f}%  top-5 err {top5:.2f}%"
        if self.ema is not None:
            ema_top1, ema_top5 = self._errors(self.ema.module)
            metrics |= {"val/ema_top1_err": ema_top1, "val/ema_top5_err": ema_top5}
            line += f"  (EMA: {ema_top1:.2f}%, {ema_top5:.2f}%)"
        self.tracker.log(metrics, self.state.epoch)
        self._print(line)

    # ----------------------------------------------------------- checkpoints
    def _facts(self) -> dict:
        return model_facts(self.model, self.num_classes, self.loaders.class_names)

    def _checkpoint(self) -> None:
        self.last_checkpoint = time.monotonic()
        self.state.mlflow_run_id = self.tracker.run_id or self.state.mlflow_run_id
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state,
            self.recipe,
            self._facts(),
            self.recipe.train.keep_checkpoints,
        )

    def _finish(self) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.runner).model
        final = self.output_dir / FINAL_MODEL
        ema = self.ema.module if self.ema is not None else None
        save_final_model(final, model, self.recipe, self._facts(), self.state, ema)
        curves = plot_curves(self.tracker, self.output_dir / "curves.png")
        if curves is not None:
            self.tracker.artifact(curves)

    def _summary(self, started: float, timing, preempted: bool = False) -> RunSummary:
        top1, top5 = self.last_val
        return RunSummary(
            name=self.recipe.name,
            method=self.recipe.method.name,
            params=self.num_params,
            steps=self.state.step,
            epochs_done=self.state.epoch + self.state.step_in_epoch / max(1, self.steps_per_epoch),
            top1_err=top1,
            top5_err=top5,
            best_top1_err=self.state.best_top1_err,
            msec_per_batch=timing[0] if timing else None,
            images_per_s=timing[1] if timing else None,
            wall_s=time.perf_counter() - started,
            mlflow_run_id=self.tracker.run_id or self.state.mlflow_run_id,
            output_dir=str(self.output_dir),
            preempted=preempted,
            skipped_files=list(self.loaders.skipped),
        )

    def _print(self, text: str) -> None:
        """Print once per job (the global main rank), not once per node."""
        if self.accelerator.is_main_process:
            print(text, flush=True)


class _Window:
    """Per-step losses and method stats since the last log, kept on the device until then."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.losses: list[torch.Tensor] = []
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.started = time.perf_counter()

    def add(self, step) -> None:
        self.losses.append(step.loss)
        for key, value in step.stats.items():
            self.stats.setdefault(key, []).append(value.float())

    def stat_means(self) -> dict[str, float]:
        """`method/<stat>`: this rank's mean over the steps that reported it (e.g. `recon` on
        the AE's clean batches only)."""
        return {f"method/{k}": float(torch.stack(v).mean()) for k, v in self.stats.items()}


def _accumulation(cfg, batch_all_gpus: int) -> int:
    """Micro-batches per optimiser step: `train.grad_accum_steps`, or from `train.global_batch`."""
    if cfg.global_batch is None:
        return cfg.grad_accum_steps
    if cfg.grad_accum_steps != 1:
        raise RecipeError("train.global_batch and train.grad_accum_steps: set one of them")
    if cfg.global_batch % batch_all_gpus:
        raise RecipeError(
            f"train.global_batch: {cfg.global_batch} is not a multiple of data.batch_size × GPUs "
            f"= {batch_all_gpus}"
        )
    return cfg.global_batch // batch_all_gpus


def _final_metrics(summary: RunSummary) -> dict[str, float]:
    values = {
        "final/top1_err": summary.top1_err,
        "final/top5_err": summary.top5_err,
        "final/best_top1_err": summary.best_top1_err,
    }
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def _recorded_results(
    folder: Path,
) -> tuple[tuple[float | None, float | None], tuple[float, float] | None]:
    """A finished run's (top-1, top-5 error) and (ms/batch, img/s) as its journal (`folder`, its
    tracking folder) last recorded them; None for what it did not record."""
    try:
        metrics = read_run(folder).metrics
    except ValueError:  # no journal, or no start in it
        return (None, None), None
    top1, top5 = (
        metrics.get(f"final/{key}", metrics.get(f"val/{key}")) for key in ("top1_err", "top5_err")
    )
    msec, ips = metrics.get("perf/msec_per_batch"), metrics.get("perf/images_per_s")
    return (top1, top5), (None if msec is None or ips is None else (msec, ips))


def _load_pretrained(model: MixNet, path: str) -> None:
    """Start from a trained model's weights (e.g. ImageNet for CUB): every tensor whose name and
    shape match, so the classifier is skipped when the number of classes differs."""
    source, _, _ = read_weights(path)
    own = model.state_dict()
    weights = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("stages.") for k in weights):
        raise CheckpointError(
            f"model.pretrained: {path} shares no backbone weights with this recipe's model"
        )
    model.load_state_dict(weights, strict=False)


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
