"""A small CUB-format dataset with true boxes, from real images scikit-learn ships.

Objects are handwritten digits (`sklearn.datasets.load_digits`, one class per digit) upscaled
and pasted at a known random place and scale onto crops of the two real photos of
`load_sample_images` (china.jpg, flower.jpg). Each class draws its strokes in a colour near its
own hue, so that a tiny network learns the classes in a few CPU steps (tests, demo); the shape
differs too. The true box is the tight box of the strokes where they cover more than half of
the pixel. Files follow wsolevaluation's layout, which `pipeline.data` also reads:

    ROOT/<NNN>.digit_<k>/<name>.jpg                      images (ids are relative to ROOT)
    ROOT/metadata/{train,test}/image_ids.txt             path
    ROOT/metadata/{train,test}/class_labels.txt          path,label
    ROOT/metadata/{train,test}/image_sizes.txt           path,width,height
    ROOT/metadata/{train,test}/localization.txt          path,x0,y0,x1,y1 (inclusive pixels)
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

__all__ = ["build_cub_demo"]


def _sources() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The two sample photos (uint8 HWC) and the digits (N, 8, 8 in [0, 1]) with labels."""
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    return list(load_sample_images().images), digits.images / 16.0, digits.target


def _background(
    photos: list[np.ndarray], width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """A random crop of a random photo, resized to (width, height), maybe mirrored."""
    photo = photos[rng.integers(len(photos))]
    side = int(rng.integers(96, min(photo.shape[:2])))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = crop.resize((width, height), Image.BILINEAR)
    array = np.asarray(crop, dtype=np.float32)
    return np.ascontiguousarray(array[:, ::-1]) if rng.random() < 0.5 else array


def _paste(
    canvas: np.ndarray, digit: np.ndarray, colour: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste one digit at a random place and scale; returns the image and its tight box."""
    height, width = canvas.shape[:2]
    side = int(rng.uniform(0.35, 0.65) * min(width, height))
    alpha = Image.fromarray(digit.astype(np.float32)).resize((side, side), Image.BICUBIC)
    alpha = np.clip(1.5 * np.asarray(alpha), 0.0, 1.0)[..., None]
    x = int(rng.integers(0, width - side + 1))
    y = int(rng.integers(0, height - side + 1))
    region = canvas[y : y + side, x : x + side]
    canvas[y : y + side, x : x + side] = (1.0 - alpha) * region + alpha * colour
    rows, cols = np.nonzero(alpha[..., 0] > 0.5)
    box = (x + int(cols.min()), y + int(rows.min()), x + int(cols.max()), y + int(rows.max()))
    return np.clip(canvas, 0, 255).astype(np.uint8), box


def _class_colour(k: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour around class k's own hue, so small networks learn in few steps."""
    hue = (k / num_classes + rng.uniform(-0.04, 0.04)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return 255.0 * np.asarray(rgb)


def _write_split(root: Path, split: str, lines: dict[str, list[str]]) -> None:
    """The four metadata files of one split, one line per entry."""
    meta = root / "metadata" / split
    meta.mkdir(parents=True, exist_ok=True)
    for name, rows in lines.items():
        (meta / name).write_text("".join(row + "\n" for row in rows))


def build_cub_demo(
    root: str | Path,
    n_train: int = 30,
    n_test: int = 10,
    size: int = 96,
    num_classes: int = 5,
    seed: int = 0,
) -> Path:
    """Write the dataset (n_train / n_test images per class, about size × size) under root."""
    if not 2 <= num_classes <= 10:
        raise PipelineError(f"--classes {num_classes}: must be between 2 and 10 (one per digit)")
    if size < 32 or min(n_train, n_test) < 1:
        raise PipelineError(
            f"need size ≥ 32 and ≥ 1 image per class, got {size}, {n_train}, {n_test}"
        )
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos, digits, targets = _sources()
    for split, per_class in (("train", n_train), ("test", n_test)):
        lines: dict[str, list[str]] = {
            "image_ids.txt": [],
            "class_labels.txt": [],
            "image_sizes.txt": [],
            "localization.txt": [],
        }
        for k in range(num_classes):
            folder = f"{k + 1:03d}.digit_{k}"
            (root / folder).mkdir(parents=True, exist_ok=True)
            pool = np.flatnonzero(targets == k)
            for i in range(per_class):
                width = size + int(rng.integers(0, size // 3 + 1))
                height = size - int(rng.integers(0, size // 5 + 1))
                canvas = _background(photos, width, height, rng)
                image, (x0, y0, x1, y1) = _paste(
                    canvas, digits[rng.choice(pool)], _class_colour(k, num_classes, rng), rng
                )
                image_id = f"{folder}/{split}_{k}_{i:04d}.jpg"
                Image.fromarray(image).save(root / image_id, quality=90)
                lines["image_ids.txt"].append(image_id)
                lines["class_labels.txt"].append(f"{image_id},{k}")
                lines["image_sizes.txt"].append(f"{image_id},{width},{height}")
                lines["localization.txt"].append(f"{image_id},{x0},{y0},{x1},{y1}")
        _write_split(root, split, lines)
    return root
