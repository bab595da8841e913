"""Validation: top-1 and top-5 error (%) on the val split every `train.eval_every` epochs and at
the run's end, of the model and of its EMA when there is one; logged against the epoch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.evaluation.metrics import TopKErrors
from pipeline.runs.checkpoints import TrainerState


@dataclass(frozen=True)
class ValResult:
    """One validation's errors (%); `ema_*` None without an EMA."""

    top1_err: float | None = None
    top5_err: float | None = None
    best_top1_err: float | None = None
    ema_top1_err: float | None = None
    ema_top5_err: float | None = None

    def metrics(self) -> dict[str, float]:
        """`val/*` as the run's journal and MLflow record them."""
        names = ("top1_err", "top5_err", "best_top1_err", "ema_top1_err", "ema_top5_err")
        found = {name: getattr(self, name) for name in names}
        return {f"val/{name}": value for name, value in found.items() if value is not None}

    def line(self, epoch: int) -> str:
        text = f"epoch {epoch}: val top-1 err {self.top1_err:.2f}%  top-5 err {self.top5_err:.2f}%"
        if self.ema_top1_err is not None:
            text += f"  (EMA: {self.ema_top1_err:.2f}%, {self.ema_top5_err:.2f}%)"
        return text


class Validator:
    """Measures a model on the val loader, under the run's autocast and memory format."""

    def __init__(
        self, accelerator, loader, num_classes: int, channels_last: bool, every: int, ema=None
    ) -> None:
        self.accelerator, self.loader, self.num_classes = accelerator, loader, num_classes
        self.channels_last, self.every, self.ema = channels_last, every, ema

    def due(self, state: TrainerState, epoch_ended: bool, run_ended: bool) -> bool:
        """After every `every`-th epoch, and at the run's end."""
        return (epoch_ended and state.epoch % self.every == 0) or run_ended

    def run(self, model: torch.nn.Module, state: TrainerState) -> ValResult:
        """Errors of `model` (and the EMA's); the best top-1 so far is kept in `state`."""
        top1, top5 = self.errors(model)
        best = top1 if state.best_top1_err is None else min(top1, state.best_top1_err)
        state.best_top1_err = best
        if self.ema is None:
            return ValResult(top1, top5, best)
        return ValResult(top1, top5, best, *self.errors(self.ema.module))

    @torch.no_grad()
    def errors(self, model: torch.nn.Module) -> tuple[float, float]:
        """Top-1 and top-5 error (%) of `model` on the val split."""
        model.eval()
        errors = TopKErrors(self.num_classes, (1, 5), self.accelerator.device)
        for images, labels in self.loader:
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.accelerator.autocast():
                errors.update(model(images).float(), labels)
        found = errors.compute()
        return found[1], found[5]
