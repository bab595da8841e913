"""CUB images with their boxes for WSOL: wsolevaluation's test-time view of the data.

The metadata is read by the data package (`pipeline.data.layouts.load_cub_metadata`, layout
`ROOT/metadata/<split>/*.txt`, image ids relative to `ROOT`), with the box checks localisation
needs; this module adds the checks that every image has a box and the size the metadata states,
and the transform of wsolevaluation: the whole image resized to a square (no crop) and its boxes
scaled with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.layouts import load_cub_metadata
from pipeline.errors import DataError
from pipeline.evaluation.boxes import resize_box

__all__ = ["CubBoxDataset"]


class CubBoxDataset(torch.utils.data.Dataset):
    """(normalised image resized to size × size, label, index); `boxes(i)` in resized pixels."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.records = load_cub_metadata(root, split, check_boxes=True)
        for record in self.records:
            if not record.boxes:
                raise DataError(
                    f"{Path(root) / 'metadata' / split / 'localization.txt'}: "
                    f"no box for image '{record.path}'"
                )
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, index: int) -> np.ndarray:
        """The resized image as uint8 (size, size, 3), for overlays."""
        record = self.records[index]
        try:
            with Image.open(record.path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"{record.path}: cannot read image ({exc})") from None
        if image.size != record.size:
            raise DataError(
                f"{record.path}: image is {image.size[0]}x{image.size[1]} but image_sizes.txt "
                f"says {record.size[0]}x{record.size[1]}"
            )
        return np.array(image.resize((self.size, self.size), Image.BILINEAR))

    def boxes(self, index: int) -> np.ndarray:
        """Ground-truth boxes (N, 4) scaled to the resized image, as wsolevaluation does."""
        record = self.records[index]
        return np.asarray(
            [resize_box(b, record.size, (self.size, self.size)) for b in record.boxes],
            dtype=np.int64,
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = torch.from_numpy(self.pixels(index)).permute(2, 0, 1).float() / 255.0
        return (image - self.mean) / self.std, self.records[index].label, index
