"""Small datasets held in memory: CIFAR-10, CIFAR-100 and Tiny-ImageNet (AlignMixup's Table 1).

`data.layout` `cifar10` / `cifar100` read the python batches as distributed
(`cifar-10-batches-py/`, `cifar-100-python/`), `tinyimagenet` reads `tiny-imagenet-200/`
(`train/<wnid>/images/*.JPEG`, `val/images/*` with `val/val_annotations.txt`); `data.root` is that
folder or the one holding it. Nothing is downloaded. Validation is CIFAR's test set and
Tiny-ImageNet's val set, as the authors report.

A whole split is one uint8 NCHW tensor on the training device (on a GPU: 150 MB for CIFAR,
1.2 GB for Tiny-ImageNet). An epoch's indices, labels and augmentation seeds go to the device
once, at its start; each batch is then sliced, gathered by index and augmented as batched
tensor operations on the device, with no host-to-device copy or sync per step: the authors'
`RandomCrop(side, padding=4)` and `RandomHorizontalFlip`, then normalised; no per-sample
Python runs in the training loop. Which sample each rank reads, and its crop offset and flip,
come from the same per-slot plan as the file loaders (`sharding.train_plan`): a function of
(seed, epoch, slot), so a resume is exact and a sample's augmentation does not depend on the
number of ranks. DALI is not used: it would decode files, and these sets are decoded once
(docs/data.md).

CIFAR's batches are pickles, and unpickling can call any function a file names: they are read by
an unpickler that resolves only what the distributed files hold (NumPy's array reconstruction),
so a crafted file is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from pipeline.data.base import PlannedLoader
from pipeline.data.image_checks import CheckedSplit
from pipeline.data.layouts import SplitIndex
from pipeline.errors import DataError

if TYPE_CHECKING:
    import torch

    from pipeline.config import DataConfig

LAYOUTS = ("cifar10", "cifar100", "tinyimagenet")
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FOLDERS["tinyimagenet"] = "tiny-imagenet-200"
_CIFAR_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "val"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "val"): ["test"],
}
_CIFAR_META = {"cifar10": ("batches.meta", "label_names", "labels")}
_CIFAR_META["cifar100"] = ("meta", "fine_label_names", "fine_labels")


@dataclass
class ArraySplit:
    """One split in memory: images (N, 3, H, W) uint8, labels (N,) int64, the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str  # where it was read, for messages


def dataset_folder(root: str | Path, layout: str) -> Path:
    """`root` itself when it is the dataset's folder, else the dataset's folder inside it."""
    root, name = Path(root), FOLDERS[layout]
    for candidate in (root, root / name):
        if candidate.name == name and candidate.is_dir():
            return candidate
    raise DataError(
        f"data.root {root}: no {name}/ folder (data.layout {layout}); put the dataset as "
        f"distributed at {root / name} (nothing is downloaded)"
    )


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals CIFAR's python batches name: NumPy's array reconstruction
    (under NumPy 1's and 2's module names, protocol 2 as distributed or 5 as re-pickled) and
    Python 3's bytes under protocol 2. Dicts, lists, bytes and numbers need none."""

    ALLOWED = frozenset(
        [(f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")]
        + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
        + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    )

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the format CIFAR is distributed in
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(
                f"{self.path}: refuses '{module}.{name}': a CIFAR python batch holds only "
                "dicts, lists, bytes, numbers and NumPy arrays, and unpickling anything else "
                "could run code; use the files of the distributed archive"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """The dict pickled in `path`, read with `_CifarUnpickler`."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing; the {path.parent.name}/ folder is incomplete (it needs every "
            "batch file of the distributed archive)"
        )
    try:
        with path.open("rb") as f:
            loaded = _CifarUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(loaded).__name__}, no dict)")
    return loaded


def _entry(batch: dict, key: str, path: Path) -> Any:
    """`batch[key]` (a bytes key, as `encoding="bytes"` reads them), or a DataError naming it."""
    try:
        return batch[key.encode()]
    except KeyError:
        raise DataError(f"{path}: no {key.encode()!r} entry") from None


def read_cifar(root: str | Path, layout: str, split: str) -> ArraySplit:
    """A CIFAR-10/100 split from the python batches (`data` rows of 3072 bytes, R then G then
    B planes of 32 × 32); every label must index the meta file's class names."""
    folder = dataset_folder(root, layout)
    meta_file, names_key, labels_key = _CIFAR_META[layout]
    meta = folder / meta_file
    names = [n.decode() for n in _entry(_unpickle(meta), names_key, meta)]
    images, labels = [], []
    for name in _CIFAR_FILES[layout, split]:
        path = folder / name
        batch = _unpickle(path)
        data, y = _entry(batch, "data", path), _entry(batch, labels_key, path)
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(y, dtype=np.int64))
        bad = np.flatnonzero((labels[-1] < 0) | (labels[-1] >= len(names)))
        if bad.size:
            raise DataError(
                f"{path}: label {labels[-1][bad[0]]} (sample {bad[0]}) is not one of the "
                f"{len(names)} classes of {meta_file} (0 to {len(names) - 1})"
            )
    return ArraySplit(np.concatenate(images), np.concatenate(labels), names, str(folder))


def _decode(paths: list[Path], side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    for i, path in enumerate(paths):  # once per dataset; the result is cached (`_cached`)
        try:
            with Image.open(path) as im:
                out[i] = np.asarray(im.convert("RGB").resize((side, side)))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: cannot be decoded ({exc})") from None
    return out.transpose(0, 3, 1, 2).copy()


def _tiny_files(folder: Path, split: str, wnids: list[str]) -> tuple[list[Path], list[int]]:
    label = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        files = [
            (p, label[w]) for w in wnids for p in sorted((folder / "train" / w).glob("images/*"))
        ]
        if not files:
            raise DataError(f"{folder / 'train'}: no train/<wnid>/images/* files")
    else:
        notes = folder / "val" / "val_annotations.txt"
        if not notes.is_file():
            raise DataError(f"{notes}: missing (Tiny-ImageNet's val labels)")
        files = []
        for n, line in enumerate(notes.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) < 2 or parts[1] not in label:
                raise DataError(f"{notes}:{n}: expected 'file wnid ...' with a wnid of wnids.txt")
            files.append((folder / "val" / "images" / parts[0], label[parts[1]]))
    missing = [str(p) for p, _ in files if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} listed Tiny-ImageNet files are missing, e.g. {missing[0]}")
    return [p for p, _ in files], [y for _, y in files]


def read_tinyimagenet(root: str | Path, split: str, cache_dir: Path | None = None) -> ArraySplit:
    """A Tiny-ImageNet split, decoded once (64 × 64 RGB) and cached as .npy beside the data
    (or in `cache_dir`) for every later start."""
    folder = dataset_folder(root, "tinyimagenet")
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"{wnids_file}: missing (the 200 class ids, one a line)")
    wnids = wnids_file.read_text().split()
    files, labels = _tiny_files(folder, split, wnids)
    key = f"{len(files)}-{sum(p.stat().st_mtime_ns for p in files[:: max(1, len(files) // 64)])}"
    images = _cached(
        folder, cache_dir, f"tinyimagenet-{split}-{key}.npy", lambda: _decode(files, 64)
    )
    return ArraySplit(images, np.asarray(labels, dtype=np.int64), wnids, str(folder))


def _cached(folder: Path, cache_dir: Path | None, name: str, make) -> np.ndarray:
    """`make()`, kept in `<folder>/.pipeline_index/name` (or `cache_dir` when read-only)."""
    for where in (folder / ".pipeline_index", cache_dir):
        if where is not None and (where / name).is_file():
            return np.load(where / name)
    array = make()
    for where in (folder / ".pipeline_index", cache_dir):
        if where is None:
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            tmp = where / f".{name}.{os.getpid()}.partial.npy"  # ranks may decode at once
            np.save(tmp, array)
            tmp.replace(where / name)
            break
        except OSError:
            continue  # read-only data: try the next place, or decode again next time
    return array


def read_split(cfg: DataConfig, split: str, cache_dir: Path | None = None) -> ArraySplit:
    """The `split` ("train" or "val") of `cfg.layout` under `cfg.root`."""
    if cfg.layout == "tinyimagenet":
        return read_tinyimagenet(cfg.root, split, cache_dir)
    return read_cifar(cfg.root, cfg.layout, split)


def augment(images: torch.Tensor, seeds: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """The authors' `RandomCrop(side, padding)` + `RandomHorizontalFlip` on a uint8 batch, as
    batched indexing: slot seed s gives the crop's top `s % k`, left `(s // k) % k` (k = 2·padding
    + 1 positions each) and a flip when `(s // k²) % 2`; zero padding, as torchvision's."""
    import torch

    n, _, h, w = images.shape
    k = 2 * padding + 1
    seeds = seeds.to(images.device, torch.int64)
    top, left, mirror = seeds % k, (seeds // k) % k, (seeds // (k * k)) % 2 == 1
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (top[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = left[:, None] + torch.arange(w, device=images.device)
    if flip:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols[:, None, None, :]]


class MemoryLoader(PlannedLoader):
    """A rank's loader over an `ArraySplit`: same plan, `len` and `set_epoch` as the others."""

    def __init__(self, data: ArraySplit, cfg: DataConfig, **kwargs):
        import torch

        names = [f"{data.source}[{i}]" for i in range(len(data.labels))]
        index = SplitIndex(names, data.labels.tolist(), data.class_names)
        super().__init__(CheckedSplit(index, np.zeros((0, 2), np.int32)), cfg, **kwargs)
        self.images = torch.from_numpy(data.images).to(self.device)  # once, for the run
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(cfg.std, device=self.device).view(shape) * 255

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A plan array on the device: from pinned memory without waiting on a GPU (a pageable
        host-to-device copy would wait for every queued kernel first)."""
        import torch

        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def __iter__(self):
        plan, start = self._take_start()
        b = plan.batch_size
        if start >= plan.steps:
            return
        # The rest of the epoch's indices, labels and augmentation seeds reach the device in
        # one copy each, here; every step then only slices them on the device: no host-to-device
        # copy, and no sync, per step.
        rest = slice(start * b, plan.steps * b)
        ids = self._to_device(plan.file_ids[rest].astype(np.int64))
        labels = self._to_device(plan.labels[rest].astype(np.int64))
        seeds = self._to_device(plan.seeds[rest].astype(np.int64)) if self.train else None
        for i in range(plan.steps - start):
            step = slice(i * b, (i + 1) * b)
            batch = self.images[ids[step]]
            if self.train:
                batch = augment(batch, seeds[step], self.cfg.crop_padding, self.cfg.flip)
            yield (batch.float() - self.mean) / self.std, labels[step]
