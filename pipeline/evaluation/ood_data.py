"""Out-of-distribution image folders: every image anywhere under a folder, no labels.

The images get the validation transform of the in-distribution data (`pipeline.data.augment`:
resize the shorter side, centre crop, normalise), so the only difference the detector sees is
the content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.data.augment import normalize, val_pil
from pipeline.data.layouts import IMAGE_EXTENSIONS
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

__all__ = ["OodFolder", "find_images", "ood_sets"]


def find_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` at any depth, sorted; none is an error naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: OOD folder not found (no such directory)")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(
            f"{folder}: OOD folder holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def ood_sets(specs: list[str | Path]) -> dict[str, Path]:
    """`[NAME=]FOLDER` arguments → {name: folder}; the name defaults to the folder's base name.

    Names are made safe for MLflow metric keys and unique (a suffix where they repeat).
    """
    sets: dict[str, Path] = {}
    for spec in map(str, specs):
        name, sep, folder = spec.partition("=")
        if not sep or not re.fullmatch(r"[\w.\-]+", name):
            name, folder = Path(spec).resolve().name, spec
        base = re.sub(r"[^\w.\-]", "_", name) or "ood"
        unique, n = base, 2
        while unique in sets:
            unique, n = f"{base}_{n}", n + 1
        sets[unique] = Path(folder)
    return sets


class OodFolder(torch.utils.data.Dataset):
    """Images (from `find_images`), each as a normalised val-transformed tensor."""

    def __init__(self, files: list[Path], data_cfg: DataConfig) -> None:
        self.files = files
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        return normalize(val_pil(image, self.cfg), self.cfg.mean, self.cfg.std)
