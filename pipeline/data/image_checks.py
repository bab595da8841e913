"""Up-front validation of image files, so nothing trains on a broken file silently.

Two depths: the quick check, run once per dataset when its index is built (index.py), reads a
file's header, which gives the size DALI's crop parameters need, and requires a JPEG to end
with its end-of-image marker, which catches files cut short; `check-data` decodes every file in
full. The quick check reads a JPEG's size with `imagesize` from the file's first 64 KB (about
twice as fast as PIL's open on a warm cache) and hands anything else to PIL.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.layouts import SplitIndex
from pipeline.data.workers import start_workers
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

# A JPEG ends with FF D9; some writers append a little trailing data, so look near the end.
_EOI = b"\xff\xd9"
_SOI = b"\xff\xd8\xff"
_TAIL_BYTES = 4096
_HEAD_BYTES = 65536  # a JPEG's frame header follows its EXIF/ICC segments, almost always within
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
    if not full:
        quick = _quick_jpeg(path)
        if quick is not None:
            return quick
    return _inspect_with_pil(path, full)


def _quick_jpeg(path: str) -> ImageInfo | None:
    """The quick check of a JPEG whose frame header `imagesize` finds in its first 64 KB; None
    for any other file (PIL then decides)."""
    import imagesize

    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
            if size > len(head):
                f.seek(size - _TAIL_BYTES)
                tail = f.read()
            else:
                tail = head[-_TAIL_BYTES:]
        if not head.startswith(_SOI):
            return None
        w, h = imagesize.get(io.BytesIO(head))
    except (OSError, ValueError):
        return None
    if w < 1 or h < 1:
        return None
    if _EOI not in tail:
        return ImageInfo(None, "truncated JPEG (no end-of-image marker)")
    return ImageInfo((int(w), int(h)), None)


def _inspect_with_pil(path: str, full: bool) -> ImageInfo:
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

    Header parsing holds the GIL (~40 µs a file), so threads do not help (measured: they are
    slower); a dataset the size of ImageNet is spread over processes (workers.py).
    """
    if workers <= 1 or len(files) < _PROCESS_POOL_MIN:
        return [inspect_image(f, full) for f in files]
    with start_workers(workers) as pool:
        return list(pool.map(partial(inspect_image, full=full), files, chunksize=1024))


@dataclass
class CheckedSplit:
    """A split after validation: the usable files, their sizes, and the problems found."""

    index: SplitIndex
    sizes: np.ndarray  # (N, 2) int32: width and height of each usable file
    problems: list[tuple[str, str]] = field(default_factory=list)


def checked_split(index: SplitIndex, infos: list[ImageInfo]) -> CheckedSplit:
    """The files of `index` whose check found no problem, and every bad file with its problem."""
    keep = [i for i, info in enumerate(infos) if info.problem is None]
    problems = list(index.problems)
    problems += [(index.files[i], info.problem) for i, info in enumerate(infos) if info.problem]
    good = SplitIndex(
        [index.files[i] for i in keep], [index.labels[i] for i in keep], index.class_names
    )
    sizes = np.asarray([infos[i].size for i in keep], dtype=np.int32).reshape(-1, 2)
    return CheckedSplit(good, sizes, problems)


def validate_split(index: SplitIndex, full: bool = False, workers: int = 4) -> CheckedSplit:
    """Inspect every file of `index`; keep the good ones, list each bad one with its problem."""
    return checked_split(index, inspect_files(index.files, full, workers))


def require_usable(checked: CheckedSplit, cfg: DataConfig, split: str) -> CheckedSplit:
    """`checked` itself, unless it has bad files (and `skip_corrupt` is off) or no usable ones."""
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
