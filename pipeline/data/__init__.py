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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.image_checks import CheckedSplit
from pipeline.data.index import IndexedSplit
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
    indexes: list[IndexedSplit] = field(default_factory=list)  # where each split's index is


def _evenly_spaced(n: int, limit: int | None) -> list[int] | None:
    """At most `limit` of `n` positions, evenly spaced so that a class-sorted list keeps all its
    classes; None when all `n` stay (`data.max_val_samples`)."""
    if limit is None or limit >= n:
        return None
    return [i * n // limit for i in range(limit)]


def _limit(split: CheckedSplit, limit: int | None) -> CheckedSplit:
    """At most `limit` samples of a checked split (`_evenly_spaced`)."""
    keep = _evenly_spaced(len(split.index), limit)
    if keep is None:
        return split
    return CheckedSplit(split.index.subset(keep), split.sizes[keep], split.problems)


def build_loaders(
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    device: torch.device | str,
    seed: int,
    class_names: list[str] | None = None,
    index_fallback_dir: str | Path | None = None,
) -> Loaders:
    """Load (or build once) the dataset's index, then build this rank's train and val loaders.

    With `class_names` (a trained model's classes) only the val split is read and `Loaders.train`
    is None: evaluation need not read the whole training set. `index_fallback_dir` keeps the
    index when the data folder is not writable (the trainer passes its output folder).
    """
    import torch

    from pipeline.data.image_checks import require_usable
    from pipeline.data.index import indexed_split

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    from pipeline.data.memory import LAYOUTS

    if data_cfg.layout in LAYOUTS:
        return _memory_loaders(
            data_cfg, rank, world_size, device, seed, class_names, index_fallback_dir
        )

    def split(name: str, names: list[str] | None) -> IndexedSplit:
        found = indexed_split(data_cfg, name, names, index_fallback_dir)
        require_usable(found.split, data_cfg, name)
        return found

    train = split("train", None) if class_names is None else None
    names = list(class_names if class_names is not None else train.split.index.class_names)
    val = split("val", names)
    if data_cfg.backend == "dali":
        from pipeline.data.dali_loader import DaliLoader as Loader
    else:
        from pipeline.data.torchvision_loader import TorchvisionLoader as Loader
    common = {"rank": rank, "world_size": world_size, "seed": seed, "device": torch.device(device)}
    val_batch = data_cfg.val_batch_size or data_cfg.batch_size
    val_split = _limit(val.split, data_cfg.max_val_samples)
    problems = (train.split.problems if train else []) + val.split.problems
    return Loaders(
        train=Loader(train.split, data_cfg, train=True, batch_size=data_cfg.batch_size, **common)
        if train
        else None,
        val=Loader(val_split, data_cfg, train=False, batch_size=val_batch, **common),
        num_classes=len(names),
        class_names=names,
        skipped=[f"{path}: {what}" for path, what in problems],
        train_index=train.split.index if train else None,
        val_index=val_split.index,
        indexes=[found for found in (train, val) if found is not None],
    )


def _memory_loaders(data_cfg, rank, world_size, device, seed, class_names, cache_dir) -> Loaders:
    """CIFAR-10/100 or Tiny-ImageNet, whole splits in memory (pipeline/data/memory.py)."""
    import torch

    from pipeline.data.memory import MemoryLoader, read_split

    cache = Path(cache_dir) if cache_dir is not None else None
    common = {"rank": rank, "world_size": world_size, "seed": seed, "device": torch.device(device)}
    train = read_split(data_cfg, "train", cache) if class_names is None else None
    val = read_split(data_cfg, "val", cache)
    names = list(class_names) if class_names is not None else val.class_names
    val_batch = data_cfg.val_batch_size or data_cfg.batch_size
    keep = _evenly_spaced(len(val.labels), data_cfg.max_val_samples)
    if keep is not None:
        val = type(val)(val.images[keep], val.labels[keep], val.class_names, val.source)
    return Loaders(
        train=MemoryLoader(train, data_cfg, train=True, batch_size=data_cfg.batch_size, **common)
        if train is not None
        else None,
        val=MemoryLoader(val, data_cfg, train=False, batch_size=val_batch, **common),
        num_classes=len(names),
        class_names=names,
    )
