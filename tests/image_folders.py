"""Small image-folder datasets of real JPEG content, and each kind of bad file, for the data
tests (tests/unit/test_data_files.py, tests/integration/test_data_index.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import DataConfig


def photo(seed: int, size=(80, 60)) -> Image.Image:
    """A crop of one of sklearn's sample photos (real JPEG content, not noise)."""
    from sklearn.datasets import load_sample_images

    p = load_sample_images().images[seed % 2]
    y, x = 40 + 7 * seed, 60 + 11 * seed
    return Image.fromarray(p[y : y + 150, x : x + 200]).resize(size, Image.BILINEAR)


def write_imagefolder(root, classes=("cat", "dog"), per_class: int = 4) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                photo(c * 10 + i).save(root / split / name / f"{name}_{i}.JPEG", quality=90)


def cfg(root, backend: str = "dali", **kw) -> DataConfig:
    base = {"backend": backend, "root": str(root), "batch_size": 2, "num_threads": 1}
    base.update(train_size=16, val_resize=16, val_crop=16, color_jitter=0.0, lighting=0.0)
    base.update(kw)
    return DataConfig(**base)


def break_dataset(root) -> dict[str, str]:
    """Write each kind of bad file; return {path: words the error must contain}."""
    garbage = root / "train" / "cat" / "garbage.JPEG"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    cut = root / "train" / "dog" / "dog_1.JPEG"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    notes = root / "val" / "cat" / "notes.txt"
    notes.write_text("not an image")
    gif = root / "val" / "dog" / "anim.JPEG"  # a GIF under a JPEG name: PIL reads it, DALI not
    photo(5).convert("P").save(gif, format="GIF")
    return {
        str(garbage): "not a readable image",
        str(cut): "truncated",
        str(notes): "not an image",
        str(gif): "unsupported image format GIF",
    }
