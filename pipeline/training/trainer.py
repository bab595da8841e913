"""The trainer: Accelerate (DDP, AMP), a mixing hook, checkpoints, MLflow.

It knows no method by name: the hook turns a batch into a loss. The loop avoids host-device
syncs except at logging, checkpoint and preemption-check steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Recipe
from pipeline.errors import CheckpointError, TrainingError
from pipeline.hooks import Hook, build_hook
from pipeline.models import MixNet, build_model, count_parameters
from pipeline.training.checkpoint import (
    FINAL_MODEL,
    TrainerState,
    latest_checkpoint,
    read_state,
    save_checkpoint,
    save_final_model,
)
from pipeline.training.optim import build_optimizer, build_schedule, scaled_lr
from pipeline.training.preempt import PreemptionWatch
from pipeline.training.tracking import Tracker, plot_curves


class HookRunner(nn.Module):
    """Runs the hook inside `forward`, so DDP sees one forward per step whatever the hook calls."""

    def __init__(self, model: MixNet, hook: Hook) -> None:
        super().__init__()
        self.model = model
        self.hook = hook

    def forward(self, images: torch.Tensor, labels: torch.Tensor, rng: torch.Generator):
        out = self.hook(self.model, images, labels, rng)
        return out.loss, out.logits, out.stats


@dataclass
class RunSummary:
    """What a run did; printed as a table and returned to callers."""

    name: str
    method: str
    params: int
    steps: int
    epochs_done: float
    top1_err: float | None
    top5_err: float | None
    best_top1_err: float | None
    msec_per_batch: float | None
    images_per_s: float | None
    wall_s: float
    mlflow_run_id: str | None
    output_dir: str
    preempted: bool = False
    skipped_files: list[str] = field(default_factory=list)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The per-step generator hooks draw from: the same on every rank and on resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Trainer:
    """Builds everything a recipe asks for; `fit()` trains, validates, checkpoints and logs."""

    def __init__(self, recipe: Recipe) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from pipeline.data import build_loaders

        if recipe.train.output_dir is None:
            recipe = recipe.model_copy(deep=True)
            recipe.train.output_dir = f"runs/{recipe.name}"
        self.recipe = recipe
        cfg = recipe.train
        self.output_dir = Path(cfg.output_dir)
        hook = build_hook(recipe)
        # Only the AE leaves parameters unused in a step (the decoder, on mixed batches).
        ddp = DistributedDataParallelKwargs(find_unused_parameters=hook.needs_decoder)
        self.accelerator = Accelerator(mixed_precision=cfg.amp, cpu=cfg.cpu, kwargs_handlers=[ddp])
        acc = self.accelerator
        set_seed(cfg.seed, device_specific=False)
        self.loaders = build_loaders(
            recipe.data,
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=acc.device,
            seed=cfg.seed,
        )
        self.num_classes = recipe.model.num_classes or self.loaders.num_classes
        model = build_model(recipe.model, self.num_classes, autoencoder=hook.needs_decoder)
        if recipe.model.pretrained:
            _load_pretrained(model, recipe.model.pretrained)
        if recipe.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.hook = hook
        self.num_params = count_parameters(model)
        runner = HookRunner(model, hook)
        if recipe.model.compile:
            runner = torch.compile(runner)

        self.steps_per_epoch = len(self.loaders.train)
        global_batch = recipe.data.batch_size * acc.num_processes
        self.base_lr = scaled_lr(recipe.optim, global_batch)
        optimizer = build_optimizer(recipe.optim, model, self.base_lr)
        self.runner, self.optimizer = acc.prepare(runner, optimizer)
        self.set_lr = build_schedule(
            recipe.optim, self.optimizer, self.base_lr, cfg.epochs, self.steps_per_epoch
        )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.state = TrainerState()
        self.last_val: tuple[float | None, float | None] = (None, None)  # top-1, top-5 error
        self.tracker = Tracker(recipe, enabled=acc.is_main_process)
        self.watch = PreemptionWatch(self.output_dir)

    # ----------------------------------------------------------------- resume
    def _resume(self) -> None:
        mode = self.recipe.train.resume
        if mode == "never":
            return
        folder = latest_checkpoint(self.output_dir) if mode == "auto" else Path(mode)
        if folder is None:
            return
        if not folder.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {folder} does not exist")
        self.accelerator.load_state(str(folder))
        self.state = read_state(folder)
        self._print(f"resumed from {folder} (epoch {self.state.epoch}, step {self.state.step})")

    # ------------------------------------------------------------------- loop
    def fit(self) -> RunSummary:
        """Train until the recipe's epochs or max_steps, or until preempted."""
        acc = self.accelerator
        started = time.perf_counter()
        self._resume()
        if self.state.finished:
            self._print(f"run in {self.output_dir} already finished; nothing to do")
            return self._summary(started, timing=None)
        self.state.mlflow_run_id = self.tracker.start(
            self.state.mlflow_run_id,
            {
                "num_params": self.num_params,
                "world_size": acc.num_processes,
                "lr_scaled": self.base_lr,
                "steps_per_epoch": self.steps_per_epoch,
            },
        )
        self.state.mlflow_run_id = _broadcast_str(acc, self.state.mlflow_run_id)
        if self.loaders.skipped:
            self.tracker.log({"data/skipped_files": float(len(self.loaders.skipped))}, 0)
        try:
            with self.watch:
                timing, preempted = self._train_epochs()
        except BaseException:
            self.tracker.end("FAILED")
            raise
        if preempted:
            self._checkpoint()
            if acc.is_main_process:
                self.watch.clear()
            self.tracker.end("KILLED")
            self._print(f"preempted at step {self.state.step}: checkpoint saved, exiting")
            return self._summary(started, timing, preempted=True)
        self.state.finished = True
        self._checkpoint()
        self._finish()
        summary = self._summary(started, timing)
        self.tracker.log(_final_metrics(summary), self.state.step)
        self.tracker.end("FINISHED")
        return summary

    def _train_epochs(self) -> tuple[tuple[float, float] | None, bool]:
        acc, cfg = self.accelerator, self.recipe.train
        timing: tuple[float, float] | None = None
        while self.state.step < self.total_steps:
            epoch = self.state.epoch
            loader = self.loaders.train
            loader.set_epoch(epoch, start_step=self.state.step_in_epoch)
            remaining = min(
                self.steps_per_epoch - self.state.step_in_epoch, self.total_steps - self.state.step
            )
            progress = _progress(remaining, f"epoch {epoch}", acc.is_main_process and cfg.progress)
            window = _Window(self.state.step)
            for images, labels in loader:
                loss = self._step(images, labels)
                window.add(loss)
                self.state.step += 1
                self.state.step_in_epoch += 1
                progress.update(1)
                if self.state.step % cfg.log_every == 0:
                    timing = self._log_window(window, progress) or timing
                    window = _Window(self.state.step)
                if self.state.step % cfg.checkpoint_every == 0:
                    self._check_finite(window)
                    self._checkpoint()
                if self.state.step % cfg.preempt_check_every == 0 and self.watch.requested(acc):
                    self._check_finite(window)
                    progress.close()
                    return timing, True
                if (
                    self.state.step >= self.total_steps
                    or self.state.step_in_epoch >= self.steps_per_epoch
                ):
                    break
            progress.close()
            timing = self._log_window(window, None) or timing
            epoch_done = self.state.step_in_epoch >= self.steps_per_epoch
            if epoch_done:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
            last = self.state.step >= self.total_steps
            if (epoch_done and self.state.epoch % cfg.eval_every == 0) or last:
                self._validate()
            if epoch_done and not last:
                self._checkpoint()
        return timing, False

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.recipe
        self.runner.train()
        if cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.set_lr(self.state.step)
        with self.accelerator.autocast():
            loss, _, _ = self.runner(
                images, labels, step_generator(cfg.train.seed, self.state.step)
            )
        self.accelerator.backward(loss)
        if cfg.optim.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.runner.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    # --------------------------------------------------------------- logging
    def _log_window(self, window: _Window, progress) -> tuple[float, float] | None:
        """Log the mean loss and speed of the steps since the last log; sync once here."""
        if not window.losses:
            return None
        self._check_finite(window)
        losses = torch.stack(window.losses)
        mean_loss = float(self.accelerator.reduce(losses.mean(), reduction="mean"))
        elapsed = time.perf_counter() - window.started
        n = len(window.losses)
        msec = 1e3 * elapsed / n
        ips = n * self.recipe.data.batch_size * self.accelerator.num_processes / elapsed
        self.tracker.log(
            {
                "train/loss": mean_loss,
                "train/lr": self.optimizer.param_groups[0]["lr"],
                "perf/msec_per_batch": msec,
                "perf/images_per_s": ips,
            },
            self.state.step,
        )
        if progress is not None:
            progress.set_postfix(loss=f"{mean_loss:.3f}", ms=f"{msec:.0f}")
        return msec, ips

    def _check_finite(self, window: _Window) -> None:
        """Stop with the first non-finite step; the last checkpoint (saved before it) stays."""
        if not window.losses:
            return
        losses = torch.stack(window.losses)
        bad = ~torch.isfinite(losses)
        if self.accelerator.num_processes > 1:
            bad_any = bad.float()
            torch.distributed.all_reduce(bad_any, op=torch.distributed.ReduceOp.MAX)
            bad = bad_any > 0
        if bool(bad.any()):
            first = window.first_step + int(bad.nonzero()[0]) + 1
            last = latest_checkpoint(self.output_dir)
            keep = f"last good checkpoint: {last}" if last else "no checkpoint was saved before it"
            raise TrainingError(
                f"non-finite loss ({float(losses[bad.nonzero()[0]])}) at step {first} "
                f"(epoch {self.state.epoch}, method {self.recipe.method.name}); {keep}"
            )

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        acc = self.accelerator
        model = acc.unwrap_model(self.runner).model
        model.eval()
        metrics = {
            k: MulticlassAccuracy(self.num_classes, top_k=k, average="micro", ignore_index=-1).to(
                acc.device
            )
            for k in (1, min(5, self.num_classes))
        }
        for images, labels in self.loaders.val:
            if self.recipe.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                logits = model(images).float()
            for metric in metrics.values():
                metric.update(logits, labels)
        top1 = 100.0 * (1.0 - float(metrics[1].compute()))
        top5 = 100.0 * (1.0 - float(metrics[min(5, self.num_classes)].compute()))
        best = top1 if self.state.best_top1_err is None else min(top1, self.state.best_top1_err)
        self.state.best_top1_err = best
        self.last_val = (top1, top5)
        self.tracker.log(
            {"val/top1_err": top1, "val/top5_err": top5, "val/best_top1_err": best},
            self.state.epoch,
        )
        self._print(f"epoch {self.state.epoch}: val top-1 err {top1:.2f}%  top-5 err {top5:.2f}%")

    # ----------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        meta = {"num_classes": self.num_classes, "class_names": self.loaders.class_names}
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state,
            self.recipe,
            meta,
            self.recipe.train.keep_checkpoints,
        )

    def _finish(self) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.runner).model
        final = self.output_dir / FINAL_MODEL
        save_final_model(
            final, model, self.recipe, self.num_classes, self.loaders.class_names, self.state
        )
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
            mlflow_run_id=self.state.mlflow_run_id,
            output_dir=str(self.output_dir),
            preempted=preempted,
            skipped_files=list(self.loaders.skipped),
        )

    def _print(self, text: str) -> None:
        """Print once per job (the global main rank), not once per node."""
        if self.accelerator.is_main_process:
            print(text, flush=True)


class _Window:
    """Per-step losses since the last log, kept on the device until then."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.losses: list[torch.Tensor] = []
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)


def _final_metrics(summary: RunSummary) -> dict[str, float]:
    values = {
        "final/top1_err": summary.top1_err,
        "final/top5_err": summary.top5_err,
        "final/best_top1_err": summary.best_top1_err,
    }
    return {k: v for k, v in values.items() if v is not None and math.isfinite(v)}


def _broadcast_str(accelerator, value: str | None) -> str | None:
    """The main rank's value on every rank (the MLflow run id is created there)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _load_pretrained(model: MixNet, path: str) -> None:
    """Start from a trained model's weights (e.g. ImageNet for CUB), skipping the classifier
    when the number of classes differs."""
    from pipeline.training.checkpoint import load_model

    source, _, _ = load_model(path)
    own = model.state_dict()
    weights = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("stages.") for k in weights):
        raise CheckpointError(
            f"model.pretrained: {path} shares no backbone weights with this recipe's model"
        )
    model.load_state_dict(weights, strict=False)


def summary_table(summaries: list[RunSummary]) -> str:
    """A plain-text table of runs, for the end of `train` and `demo`."""
    cols = [
        "run",
        "method",
        "params",
        "steps",
        "top-1 err",
        "best",
        "top-5 err",
        "ms/batch",
        "img/s",
        "wall s",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = []
    for s in summaries:
        rows.append(
            [
                s.name,
                s.method,
                f"{s.params / 1e6:.2f}M",
                str(s.steps),
                fmt(s.top1_err, ".2f"),
                fmt(s.best_top1_err, ".2f"),
                fmt(s.top5_err, ".2f"),
                fmt(s.msec_per_batch, ".0f"),
                fmt(s.images_per_s, ".0f"),
                f"{s.wall_s:.0f}",
            ]
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(cells, widths, strict=True))

    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])
