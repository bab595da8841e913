"""The dataset index: each split scanned and quick-checked once per dataset, not per rank per start.

An index file holds one split: the files (relative to the data root), labels, image sizes,
class names, the bad files and bad folders found, and the signature of what the scan read (the
st_mtime_ns of every folder it listed, or of the list and metadata files). It is one `.npz` of
plain arrays, loaded without unpickling. A start loads it and stats those folders (1,001 stats
for ImageNet's train split); a changed signature rebuilds it.

Where: `data.index_dir` when the recipe names one, else `<root>/.pipeline_index/` when the data
folder is writable, else the caller's fallback (the trainer's `<output_dir>/data_index/`). With
several ranks in a `torch.distributed` group, rank 0 scans the folders, every rank quick-checks
its share of the files, the results are gathered, and rank 0 writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.image_checks import CheckedSplit, ImageInfo, checked_split, inspect_files
from pipeline.data.layouts import SplitIndex, scan_split
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

__all__ = ["IndexedSplit", "indexed_split", "save_index"]

VERSION = 1
FOLDER = ".pipeline_index"
# A source modified this close before its scan began may have changed within one timestamp
# tick of the listing, so the index built from it is not trusted the next time.
_SETTLE_NS = 2_000_000_000


@dataclass
class IndexedSplit:
    """A checked split, the index file it came from or was written to, and whether it was built
    by this start (False: loaded)."""

    split: CheckedSplit
    path: Path | None
    built: bool


def _key(cfg: DataConfig, split: str, class_names: list[str] | None) -> str:
    """What makes two indexes interchangeable: the layout, the data, the split and its classes."""
    lists = [cfg.train_list, cfg.val_list] if cfg.layout == "filelist" else []
    ident = {
        "version": VERSION,
        "layout": cfg.layout,
        "root": os.path.realpath(cfg.root),
        "split": split,
        "lists": [os.path.realpath(p) if p else None for p in lists],
        "classes": class_names,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _file_name(cfg: DataConfig, split: str, class_names: list[str] | None) -> str:
    return f"{split}-{_key(cfg, split, class_names)}.npz"


def _folders(cfg: DataConfig, fallback_dir: str | Path | None) -> list[Path]:
    """Where an index may live, in the order they are read and tried for writing."""
    if cfg.index_dir is not None:
        return [Path(cfg.index_dir)]
    found = [Path(cfg.root) / FOLDER]
    if fallback_dir is not None:
        found.append(Path(fallback_dir))
    return found


def _pack(strings: list[str]) -> np.ndarray:
    """Strings (no newlines) as one uint8 array: one buffer instead of a million objects."""
    return np.frombuffer("\n".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _unpack(blob: np.ndarray) -> list[str]:
    text = blob.tobytes().decode("utf-8", "surrogateescape")
    return text.split("\n") if text else []


def _pack_pairs(rows: list[tuple[str, str]]) -> np.ndarray:
    return _pack([f"{path}\t{what}" for path, what in rows])


def _unpack_pairs(blob: np.ndarray) -> list[tuple[str, str]]:
    return [tuple(row.split("\t", 1)) for row in _unpack(blob)]  # type: ignore[misc]


def _relative(paths: list[str], root: str) -> list[str]:
    prefix = os.path.join(root, "")
    return [p[len(prefix) :] if p.startswith(prefix) else p for p in paths]


def _absolute(paths: list[str], root: str) -> list[str]:
    prefix = os.path.join(root, "")
    return [p if os.path.isabs(p) else prefix + p for p in paths]


def _save(path: Path, index: SplitIndex, checked: CheckedSplit, root: str, stable: bool) -> None:
    """Write the index atomically: a temporary name in the same folder, then a rename."""
    sources = dict(zip(_relative(list(index.sources), root), index.sources.values(), strict=True))
    meta = {
        "version": VERSION,
        "stable": stable,
        "sources": sources,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            files=_pack(_relative(checked.index.files, root)),
            labels=np.asarray(checked.index.labels, dtype=np.int32),
            sizes=np.asarray(checked.sizes, dtype=np.int32).reshape(-1, 2),
            class_names=_pack(checked.index.class_names),
            problems=_pack_pairs(checked.problems),
            errors=_pack_pairs(index.errors),
        )
    os.replace(tmp, path)


def _load(path: Path, root: str) -> tuple[CheckedSplit, list[tuple[str, str]]] | None:
    """The checked split and bad folders in `path`, or None when it is missing, unreadable, of
    another version, or its sources changed since it was built."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            if meta.get("version") != VERSION or not meta.get("stable"):
                return None
            for source, mtime in meta["sources"].items():
                if os.stat(os.path.join(root, source)).st_mtime_ns != mtime:
                    return None
            index = SplitIndex(
                _absolute(_unpack(data["files"]), root),
                data["labels"].tolist(),
                _unpack(data["class_names"]),
            )
            checked = CheckedSplit(index, data["sizes"], _unpack_pairs(data["problems"]))
            return checked, _unpack_pairs(data["errors"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, cut short or not ours: build it again


def _group() -> Any:
    """`torch.distributed` when this process is one of several in a group, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _scan_everywhere(dist, cfg: DataConfig, split: str, class_names) -> SplitIndex:
    """Rank 0 scans; every rank gets its index (or the DataError it raised)."""
    found: list[Any] = [None]
    if dist is None or dist.get_rank() == 0:
        try:
            found = [scan_split(cfg, split, class_names)]
        except DataError as exc:
            found = [exc]
    if dist is not None:
        dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], Exception):
        raise found[0]
    return found[0]


def _check_everywhere(dist, files: list[str], workers: int) -> list[ImageInfo]:
    """The quick check of `files`, each rank checking every world-th file, gathered in order."""
    if dist is None:
        return inspect_files(files, full=False, workers=workers)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = inspect_files(files[rank::world], full=False, workers=workers)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    infos: list[ImageInfo] = [None] * len(files)  # type: ignore[list-item]
    for r, part in enumerate(parts):
        infos[r::world] = part
    return infos


def indexed_split(
    cfg: DataConfig,
    split: str,
    class_names: list[str] | None = None,
    fallback_dir: str | Path | None = None,
) -> IndexedSplit:
    """The split's checked files from its index, building (and saving) the index if needed.

    Bad folders are DataErrors here; bad files are in `split.problems` (the caller decides
    whether they are skipped). All ranks of a group must call this together.
    """
    dist = _group()
    root = os.path.abspath(cfg.root)
    name = _file_name(cfg, split, class_names)
    loaded = None
    for folder in _folders(cfg, fallback_dir):
        found = _load(folder / name, root)
        if found is not None:
            loaded = found, folder / name
            break
    if dist is not None:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, loaded is not None)
        if not all(everyone):
            loaded = None
    if loaded is not None:
        (checked, errors), path = loaded
        built = False
    else:
        started = time.time_ns()
        index = _scan_everywhere(dist, cfg, split, class_names)
        errors = index.errors
        checked = checked_split(index, _check_everywhere(dist, index.files, cfg.num_threads))
        path = None
        if dist is None or dist.get_rank() == 0:
            path = save_index(cfg, split, class_names, index, checked, fallback_dir, started)
        built = True
    if errors:
        raise DataError("; ".join(f"{p}: {what}" for p, what in errors))
    return IndexedSplit(checked, path, built)


def save_index(
    cfg: DataConfig,
    split: str,
    class_names: list[str] | None,
    index: SplitIndex,
    checked: CheckedSplit,
    fallback_dir: str | Path | None = None,
    scan_started_ns: int | None = None,
) -> Path | None:
    """Save a split's index in the first folder that takes it; None when none does (the next
    start scans again). `scan_started_ns`: when the scan began (default: now); sources
    modified within 2 s before it make the index untrusted (the next start scans again)."""
    started = time.time_ns() if scan_started_ns is None else scan_started_ns
    stable = all(mtime < started - _SETTLE_NS for mtime in index.sources.values())
    name = _file_name(cfg, split, class_names)
    for folder in _folders(cfg, fallback_dir):
        try:
            _save(folder / name, index, checked, os.path.abspath(cfg.root), stable)
        except OSError:
            continue
        return folder / name
    return None
