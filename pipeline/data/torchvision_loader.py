"""The torchvision backend: PIL decode and torchvision ops in DataLoader workers.

Workers return float32 normalised crops (lighting folded into the mean, see augment.py). The
DataLoader gets its own generator, so iterating it never draws from the trainer's global RNG
(which would make a resumed run diverge). Its workers are treated as workers.py's: they ignore the
signals that ask the trainer to stop, and die with it.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from pipeline.data.augment import draw_train_params, normalize, shifted_mean, train_pil, val_pil
from pipeline.data.base import PlannedLoader
from pipeline.data.workers import detach_worker, kill_daemonic_workers_at_exit, stop_signals_held

if TYPE_CHECKING:
    from pipeline.config import DataConfig
    from pipeline.data.image_checks import CheckedSplit
    from pipeline.data.sharding import RankPlan


class SlotDataset:
    """Map-style dataset indexed by plan slots `(file_id, label, seed)` rather than by position."""

    def __init__(
        self, files: list[str], sizes: list[tuple[int, int]], cfg: DataConfig, train: bool
    ):
        self.files, self.sizes, self.cfg, self.train = files, sizes, cfg, train

    def __getitem__(self, slot: tuple[int, int, int]):
        """Decode and transform one file → (float32 CHW tensor, label)."""
        from PIL import Image

        file_id, label, seed = slot
        with Image.open(self.files[file_id]) as raw:
            img = raw.convert("RGB")
        mean = self.cfg.mean
        if self.train:
            params = draw_train_params(seed, self.sizes[file_id], self.cfg)
            img = train_pil(img, params, self.cfg)
            mean = shifted_mean(mean, params.alpha)
        else:
            img = val_pil(img, self.cfg)
        return normalize(img, mean, self.cfg.std), label


def _worker_init(parent: int, worker_id: int) -> None:
    """A DataLoader worker's start, as a pool worker's (workers.py); the id is not needed."""
    detach_worker(parent)


class _PlanBatches:
    """Batch sampler over a plan from batch `start`, both set before each iteration."""

    def __init__(self, plan: RankPlan):
        self.plan, self.start = plan, 0

    def __iter__(self):
        for ids, labels, seeds in self.plan.batches(self.start):
            yield [(int(i), int(y), int(s)) for i, y, s in zip(ids, labels, seeds, strict=True)]

    def __len__(self) -> int:
        return self.plan.steps - self.start


class TorchvisionLoader(PlannedLoader):
    """Iterable of (images, labels) on `device` for one rank; see pipeline/data/__init__.py."""

    def __init__(self, split: CheckedSplit, cfg: DataConfig, **kwargs):
        import torch
        import torchvision.transforms  # noqa: F401  (imported here so forked workers inherit it)
        from torch.utils.data import DataLoader

        super().__init__(split, cfg, **kwargs)
        self._batches = _PlanBatches(self._plan)
        workers = cfg.num_threads
        kill_daemonic_workers_at_exit()
        self._loader = DataLoader(
            SlotDataset(self.files, self.sizes, cfg, self.train),
            batch_sampler=self._batches,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator(),
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
        )

    def __iter__(self):
        # DataLoader reads the sampler when its iteration starts, so set it just before.
        self._batches.plan, self._batches.start = self._take_start()
        with stop_signals_held():  # the first iteration forks the workers
            batches = iter(self._loader)
        return self._run(batches)

    def _run(self, batches):
        non_blocking = self.device.type == "cuda"
        for images, labels in batches:
            labels = labels.to(self.device, non_blocking=non_blocking)
            yield images.to(self.device, non_blocking=non_blocking), labels
