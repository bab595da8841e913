"""What both loader backends share: the file list, this rank's plan, `set_epoch` and `len`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.sharding import RankPlan, train_plan, val_plan

if TYPE_CHECKING:
    import torch

    from pipeline.config import DataConfig
    from pipeline.data.image_checks import CheckedSplit


class PlannedLoader:
    """A rank's loader over a checked split; subclasses decode the planned batches."""

    def __init__(
        self,
        split: CheckedSplit,
        cfg: DataConfig,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        import torch

        self.cfg, self.train, self.device = cfg, train, torch.device(device)
        self.files, self.labels, self.sizes = split.index.files, split.index.labels, split.sizes
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.start_step = 0, 0
        self._plan = self._make_plan(0)

    def _make_plan(self, epoch: int) -> RankPlan:
        if self.train:
            args = (self.batch_size, self.rank, self.world_size, self.seed, epoch)
            return train_plan(self.labels, *args)
        return val_plan(self.labels, self.batch_size, self.rank, self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Reshuffle for `epoch`; the next iteration starts at batch `start_step`."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} outside 0..{len(self)}")
        self.epoch, self.start_step = epoch, start_step
        self._plan = self._make_plan(epoch)

    def plan(self) -> RankPlan:
        """This rank's plan for the current epoch (which files, in which order)."""
        return self._plan

    def __len__(self) -> int:
        return self._plan.steps

    def _take_start(self) -> tuple[RankPlan, int]:
        """The plan and start step of the iteration beginning now; later ones start at 0."""
        start, self.start_step = self.start_step, 0
        return self._plan, start
