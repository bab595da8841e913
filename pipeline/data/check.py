"""Up-front validation of image files, so nothing trains on a broken file silently.

Two depths: the loaders run the cheap check on every file at start-up (PIL parses the
header, which also gives the size DALI's crop parameters need, and a JPEG must end with its
end-of-image marker, which catches files cut short); `check-data` decodes every file in full.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.layouts import SPLITS, SplitIndex, scan_split
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

# A JPEG ends with FF D9; some writers append a little trailing data, so look near the end.
_EOI = b"\xff\xd9"
_TAIL_BYTES = 4096
# Below this many files a single process is quicker than starting a pool.
_PROCESS_POOL_MIN = 20_000
# PIL format names of what both PIL and DALI's decoders read (MPO: multi-picture camera JPEGs).
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}


@dataclass
class ImageInfo:
    """What a check found: the size (w, h) of a readable image, or the problem with it."""

    size: tuple[int, int] | None
    problem: str | None


def inspect_image(path: str, full: bool = False) -> ImageInfo:
    """Check one file: header (and the JPEG end marker), or with `full` a complete decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size = (int(img.width), int(img.height))
            fmt = img.format
            if full:
                img.load()
            else:
                img.verify()
    except FileNotFoundError:
        return ImageInfo(None, "file not found")
    except UnidentifiedImageError:
        return ImageInfo(None, "not a readable image (unknown or corrupt format)")
    except (OSError, SyntaxError, ValueError) as exc:
        return ImageInfo(None, f"corrupt image ({exc})")
    if fmt not in DECODABLE_FORMATS:
        return ImageInfo(None, f"unsupported image format {fmt} (DALI cannot decode it)")
    if size[0] < 1 or size[1] < 1:
        return ImageInfo(None, f"image has no pixels ({size[0]}x{size[1]})")
    if fmt == "JPEG" and not full:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            if _EOI not in f.read():
                return ImageInfo(None, "truncated JPEG (no end-of-image marker)")
    return ImageInfo(size, None)


def inspect_files(files: list[str], full: bool, workers: int) -> list[ImageInfo]:
    """`inspect_image` over many files, on `workers` processes for large lists.

    Header parsing holds the GIL (~0.1 ms a file), so threads do not help; a dataset the
    size of ImageNet is spread over processes (forkserver: safe from a threaded parent).
    """
    if workers <= 1 or len(files) < _PROCESS_POOL_MIN:
        return [inspect_image(f, full) for f in files]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(partial(inspect_image, full=full), files, chunksize=1024))


@dataclass
class CheckedSplit:
    """A split after validation: the usable files (with sizes) and the problems found."""

    index: SplitIndex
    sizes: list[tuple[int, int]]
    problems: list[tuple[str, str]] = field(default_factory=list)


def validate_split(index: SplitIndex, full: bool = False, workers: int = 4) -> CheckedSplit:
    """Inspect every file of `index`; keep the good ones, list each bad one with its problem."""
    infos = inspect_files(index.files, full, workers)
    keep = [i for i, info in enumerate(infos) if info.problem is None]
    problems = list(index.problems)
    problems += [(index.files[i], info.problem) for i, info in enumerate(infos) if info.problem]
    good = index.subset(keep)
    good.problems, good.errors = [], []
    return CheckedSplit(good, [infos[i].size for i in keep], problems)  # type: ignore[misc]


def load_checked_split(
    cfg: DataConfig, split: str, class_names: list[str] | None = None
) -> CheckedSplit:
    """Scan and quick-check a split; a bad file is a DataError unless `skip_corrupt` is set.

    Bad folders (an empty class, an unknown val class) are errors either way: skipping them
    would change the set of classes.
    """
    index = scan_split(cfg, split, class_names)
    if index.errors:
        raise DataError("; ".join(f"{path}: {what}" for path, what in index.errors))
    checked = validate_split(index, workers=cfg.num_threads)
    if checked.problems and not cfg.skip_corrupt:
        shown = "; ".join(f"{path}: {what}" for path, what in checked.problems[:5])
        more = len(checked.problems) - 5
        tail = f" (and {more} more)" if more > 0 else ""
        raise DataError(
            f"{len(checked.problems)} bad file(s) in split '{split}': {shown}{tail}. "
            "Fix or remove them, or set data.skip_corrupt=true to skip them"
        )
    if not checked.index.files:
        raise DataError(f"{cfg.root}: split '{split}' has no usable images")
    return checked


@dataclass
class CheckReport:
    """What `check-data` found: per split the image count, and every problem."""

    root: str
    layout: str
    class_names: list[str]
    images: dict[str, int]
    problems: list[tuple[str, str]]


def check_dataset(cfg: DataConfig, full: bool = True) -> CheckReport:
    """Validate both splits of a dataset (decoding every file when `full`)."""
    if not Path(cfg.root).is_dir():
        raise DataError(f"{cfg.root}: data folder not found (no such directory)")
    images: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    class_names: list[str] | None = None
    for split in ("train", "val"):
        try:
            index = scan_split(cfg, split, class_names)
        except DataError as exc:
            problems.append((f"split {split}", str(exc)))
            continue
        class_names = class_names or index.class_names
        checked = validate_split(index, full=full, workers=cfg.num_threads)
        images[SPLITS[cfg.layout][split == "val"]] = len(checked.index)
        problems += index.errors + checked.problems
    return CheckReport(str(Path(cfg.root)), cfg.layout, class_names or [], images, problems)


def format_report(report: CheckReport) -> str:
    """A human summary of a CheckReport: classes, images per split, then each problem."""
    names = report.class_names
    shown = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
    lines = [
        f"dataset {report.root} (layout {report.layout})",
        f"  classes: {len(names)}" + (f" ({shown})" if names else ""),
    ]
    lines += [f"  {split}: {count} images" for split, count in report.images.items()]
    if report.problems:
        lines.append(f"  problems: {len(report.problems)}")
        lines += [f"    {path}: {what}" for path, what in report.problems]
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
