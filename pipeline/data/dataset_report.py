"""`check-data`: validate a whole dataset up front, report every problem, and write its index."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.image_checks import validate_split
from pipeline.data.index import save_index
from pipeline.data.layouts import SPLITS, scan_split
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig


@dataclass
class CheckReport:
    """What `check-data` found: per split the image count, and every problem."""

    root: str
    layout: str
    class_names: list[str]
    images: dict[str, int]
    problems: list[tuple[str, str]]
    indexes: list[str] = field(default_factory=list)  # index files written, one per split


def check_dataset(
    cfg: DataConfig, full: bool = True, fallback_dir: str | Path | None = None
) -> CheckReport:
    """Validate both splits of a dataset (decoding every file when `full`), and write each
    split's index from what was found, so that the next run starts without a scan."""
    if not Path(cfg.root).is_dir():
        raise DataError(f"{cfg.root}: data folder not found (no such directory)")
    images: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    class_names: list[str] | None = None
    indexes: list[str] = []
    for split in ("train", "val"):
        started = time.time_ns()
        try:
            index = scan_split(cfg, split, class_names)
        except DataError as exc:
            problems.append((f"split {split}", str(exc)))
            continue
        class_names = class_names or index.class_names
        checked = validate_split(index, full=full, workers=cfg.num_threads)
        images[SPLITS[cfg.layout][split == "val"]] = len(checked.index)
        problems += index.errors + checked.problems
        classes = None if split == "train" else class_names
        written = save_index(cfg, split, classes, index, checked, fallback_dir, started)
        if written is not None:
            indexes.append(str(written))
    return CheckReport(
        str(Path(cfg.root)), cfg.layout, class_names or [], images, problems, indexes
    )


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
    lines += [f"  index: {path}" for path in report.indexes]
    return "\n".join(lines)
