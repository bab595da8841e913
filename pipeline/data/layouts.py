"""Dataset layouts turned into one file list: (path, label) pairs plus class names.

Both loader backends read the same `SplitIndex`, so they see the same files in the same order.
Three layouts (recipe `data.layout`):

- `imagefolder`: ImageNet style, `ROOT/train/<class>/*` and `ROOT/val/<class>/*`; classes are
  the sorted folder names of `train` (val may hold a subset of them).
- `filelist`: text files of `relative/path label` lines (recipe `data.train_list`,
  `data.val_list`; relative to `ROOT` when not absolute), paths relative to `ROOT`.
- `cub`: CUB-200-2011 in wsolevaluation's metadata layout, `ROOT/metadata/<split>/` holding
  `image_ids.txt`, `class_labels.txt`, `image_sizes.txt` and `localization.txt`, image paths
  relative to `ROOT`; the loaders train on `train` and validate on `test`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

# Extensions both PIL and DALI's decoders read (torchvision's IMG_EXTENSIONS less .pgm/.ppm
# variants DALI treats alike); anything else in a class folder is reported as a non-image file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

SPLITS = {"imagefolder": ("train", "val"), "filelist": ("train", "val"), "cub": ("train", "test")}


@dataclass
class SplitIndex:
    """One split: absolute file paths, integer labels, and the dataset's class names."""

    files: list[str]
    labels: list[int]
    class_names: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # bad files, skippable
    errors: list[tuple[str, str]] = field(default_factory=list)  # bad folders, never skipped
    # What the scan read, with its st_mtime_ns taken just before: every folder it listed, or
    # the list and metadata files. A file added, removed or renamed changes its folder's.
    sources: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: list[int]) -> SplitIndex:
        """The same split restricted to the positions in `keep` (in that order)."""
        return SplitIndex(
            [self.files[i] for i in keep],
            [self.labels[i] for i in keep],
            self.class_names,
            list(self.problems),
            list(self.errors),
            dict(self.sources),
        )


@dataclass(frozen=True)
class CubRecord:
    """One CUB image: path, label, ground-truth boxes (x0, y0, x1, y1) and size (w, h)."""

    path: str
    label: int
    boxes: list[tuple[float, float, float, float]]
    size: tuple[int, int]


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found (no such directory)")


def _listed(folder: str, sources: dict[str, int]) -> list[os.DirEntry]:
    """The visible entries of `folder`, its mtime recorded in `sources` before the listing."""
    sources[folder] = os.stat(folder).st_mtime_ns
    with os.scandir(folder) as entries:
        return [e for e in entries if not e.name.startswith(".")]


def _files_below(folder: str, sources: dict[str, int]) -> list[str]:
    """Every file under `folder`, hidden entries skipped, in path order (as `sorted(rglob)`).

    `os.scandir` gives each entry's type without a stat, which matters at 1.3M files."""
    found, pending = [], [folder]
    while pending:
        for entry in _listed(pending.pop(), sources):
            (pending if entry.is_dir() else found).append(entry.path)
    return sorted(found, key=lambda path: path.split(os.sep))


def scan_imagefolder(
    root: str | Path, split: str, class_names: list[str] | None = None
) -> SplitIndex:
    """`ROOT/<split>/<class>/*` → SplitIndex; non-image files are problems, empty classes errors.

    `class_names` (from the train split) fixes the label of each folder; a val folder whose class
    is not among them is an error, since the model could never predict it.
    """
    root = Path(root)
    _require_dir(root, "data folder")
    split_dir = root / split
    _require_dir(split_dir, f"split '{split}' of {root}")
    sources: dict[str, int] = {}
    folders = sorted(e.path for e in _listed(str(split_dir), sources) if e.is_dir())
    if not folders:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    folder_names = [os.path.basename(f) for f in folders]
    names = class_names if class_names is not None else folder_names
    label_of = {name: i for i, name in enumerate(names)}
    index = SplitIndex([], [], list(names), sources=sources)
    for folder, name in zip(folders, folder_names, strict=True):
        if name not in label_of:
            index.errors.append((folder, f"class '{name}' is not among the train classes"))
            continue
        count = 0
        for path in _files_below(folder, sources):
            if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
                index.problems.append((path, "not an image file (extension)"))
                continue
            index.files.append(path)
            index.labels.append(label_of[name])
            count += 1
        if count == 0:
            index.errors.append((folder, "empty class folder (no image files)"))
    return index


def read_filelist(list_path: str | Path, root: str | Path) -> SplitIndex:
    """Lines `relative/path label` → SplitIndex (class names are the label numbers)."""
    root = Path(root)
    list_path = Path(list_path)
    if not list_path.is_absolute() and not list_path.is_file():
        list_path = root / list_path
    if not list_path.is_file():
        raise DataError(f"{list_path}: file list not found")
    index = SplitIndex([], [], [], sources={str(list_path): os.stat(list_path).st_mtime_ns})
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise DataError(f"{list_path}:{lineno}: expected 'path label', got {line!r}")
        index.files.append(str(root / parts[0]))
        index.labels.append(int(parts[1]))
    if not index.files:
        raise DataError(f"{list_path}: file list is empty")
    index.class_names = [str(i) for i in range(max(index.labels) + 1)]
    return index


def _read_rows(path: Path, width: int, number: type = str) -> list[tuple[int, list]]:
    """(line number, row) of comma-separated rows of `width` fields, all but the first field
    converted with `number`."""
    if not path.is_file():
        raise DataError(f"{path}: CUB metadata file not found")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = [part.strip() for part in line.split(",")]
        if len(row) != width:
            raise DataError(
                f"{path}:{lineno}: expected {width} comma-separated fields, got {line!r}"
            )
        try:
            rows.append((lineno, [row[0], *(number(v) for v in row[1:])]))
        except ValueError:
            raise DataError(
                f"{path}:{lineno}: expected {number.__name__} values after the image id, "
                f"got {line!r}"
            ) from None
    return rows


def load_cub_metadata(root: str | Path, split: str, check_boxes: bool = False) -> list[CubRecord]:
    """wsolevaluation metadata for one split → one CubRecord per image, in image_ids.txt order.

    With `check_boxes` (localisation needs it), every line of localization.txt must name a
    listed image and hold x0 ≤ x1, y0 ≤ y1 inside it; a box may end on the image's far edge
    (x1 = w), which exclusive-end converters write.
    """
    root = Path(root)
    _require_dir(root, "data folder")
    meta = root / "metadata" / split
    _require_dir(meta, f"CUB metadata of split '{split}'")
    ids = [row[0] for _, row in _read_rows(meta / "image_ids.txt", 1)]
    labels = {p: v for _, (p, v) in _read_rows(meta / "class_labels.txt", 2, int)}
    sizes = {p: (w, h) for _, (p, w, h) in _read_rows(meta / "image_sizes.txt", 3, int)}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for lineno, (p, *xyxy) in _read_rows(meta / "localization.txt", 5, float):
        if check_boxes:
            _check_box(meta / "localization.txt", lineno, p, xyxy, sizes)
        boxes.setdefault(p, []).append(tuple(xyxy))
    records = []
    for p in ids:
        for table, name in ((labels, "class_labels.txt"), (sizes, "image_sizes.txt")):
            if p not in table:
                raise DataError(f"{meta / name}: no entry for image '{p}'")
        records.append(CubRecord(str(root / p), labels[p], boxes.get(p, []), sizes[p]))
    if not records:
        raise DataError(f"{meta / 'image_ids.txt'}: no images listed")
    return records


def _check_box(
    path: Path, lineno: int, image_id: str, xyxy: list[float], sizes: dict[str, tuple[int, int]]
) -> None:
    if image_id not in sizes:
        raise DataError(f"{path}:{lineno}: image '{image_id}' is not in image_sizes.txt")
    (x0, y0, x1, y1), (w, h) = xyxy, sizes[image_id]
    if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
        raise DataError(
            f"{path}:{lineno}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) of '{image_id}' is not "
            f"inside its {w}x{h} image"
        )


def scan_cub(root: str | Path, split: str) -> SplitIndex:
    """CUB split → SplitIndex; class names are the first path component of each class's images."""
    meta = Path(root) / "metadata" / split
    sources = {str(p): p.stat().st_mtime_ns for p in sorted(meta.glob("*.txt"))}
    records = load_cub_metadata(root, split)
    num_classes = max(r.label for r in records) + 1
    names = [str(i) for i in range(num_classes)]
    for r in records:
        parent = Path(r.path).relative_to(root).parts
        if len(parent) > 1:
            names[r.label] = parent[0]
    return SplitIndex([r.path for r in records], [r.label for r in records], names, sources=sources)


def scan_split(cfg: DataConfig, split: str, class_names: list[str] | None = None) -> SplitIndex:
    """The recipe's layout → the file list of `split` ('train' or 'val')."""
    if cfg.layout == "imagefolder":
        return scan_imagefolder(cfg.root, split, class_names)
    if cfg.layout == "filelist":
        list_path = cfg.train_list if split == "train" else cfg.val_list
        if list_path is None:
            raise DataError(f"data.{split}_list: required by data.layout=filelist")
        index = read_filelist(list_path, cfg.root)
        if class_names is not None:
            if max(index.labels) >= len(class_names):
                raise DataError(f"{list_path}: label {max(index.labels)} ≥ train classes")
            index.class_names = list(class_names)
        return index
    _require_dir(Path(cfg.root), "data folder")
    return scan_cub(cfg.root, "train" if split == "train" else "test")
