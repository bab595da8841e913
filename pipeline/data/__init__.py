"""Data loaders behind one interface: `build_loaders(data_cfg, rank, world_size, device, seed)`.

`Loaders.train` and `Loaders.val` yield `(images, labels)` on `device`: images float32 NCHW,
normalised with the recipe's mean/std from [0, 1] pixels; labels int64 (-1 on val padding).
`len(loader)` is the number of steps per epoch, equal on every rank; `loader.set_epoch(epoch,
start_step)` reshuffles from (seed, epoch) and makes the next iteration start at `start_step`.
Do not pass the loaders to `accelerator.prepare`: they shard by rank themselves.
The backend (`data.backend`: dali | torchvision) changes only how images are decoded.
See docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.data.layouts import CubRecord, SplitIndex, load_cub_metadata

if TYPE_CHECKING:
    import torch

    from pipeline.config import DataConfig

__all__ = ["CubRecord", "Loaders", "SplitIndex", "build_loaders", "load_cub_metadata"]


@dataclass
class Loaders:
    """The train and val loaders of one rank, the class names and any files skipped as bad."""

    train: Any
    val: Any
    num_classes: int
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: problem", with data.skip_corrupt
    train_index: SplitIndex | None = None  # the file list and labels each loader reads
    val_index: SplitIndex | None = None


def _limit(index: SplitIndex, sizes: list, limit: int | None) -> tuple[SplitIndex, list]:
    """At most `limit` samples, evenly spaced over the (class-sorted) list, so all classes stay."""
    if limit is None or limit >= len(index):
        return index, sizes
    keep = [i * len(index) // limit for i in range(limit)]
    return index.subset(keep), [sizes[i] for i in keep]


def build_loaders(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    class_names: list[str] | None = None,
) -> Loaders:
    """Scan and check the dataset, then build this rank's train and val loaders.

    With `class_names` (a trained model's classes) only the val split is scanned and checked
    and `Loaders.train` is None: evaluation need not read the whole training set.
    """
    import torch

    from pipeline.data.check import load_checked_split

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    train = load_checked_split(data_cfg, "train") if class_names is None else None
    names = list(class_names if class_names is not None else train.index.class_names)
    val = load_checked_split(data_cfg, "val", names)
    val.index, val.sizes = _limit(val.index, val.sizes, data_cfg.max_val_samples)
    if data_cfg.backend == "dali":
        from pipeline.data.dali_loader import DaliLoader as Loader
    else:
        from pipeline.data.torchvision_loader import TorchvisionLoader as Loader
    common = {"rank": rank, "world_size": world_size, "seed": seed, "device": torch.device(device)}
    val_batch = data_cfg.val_batch_size or data_cfg.batch_size
    problems = (train.problems if train else []) + val.problems
    return Loaders(
        train=Loader(train, data_cfg, train=True, batch_size=data_cfg.batch_size, **common)
        if train
        else None,
        val=Loader(val, data_cfg, train=False, batch_size=val_batch, **common),
        num_classes=len(names),
        class_names=names,
        skipped=[f"{path}: {what}" for path, what in problems],
        train_index=train.index if train else None,
        val_index=val.index,
    )
