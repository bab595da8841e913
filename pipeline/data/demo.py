"""The demo dataset: scikit-learn's 1,797 handwritten digits as a folder of real JPEGs.

Each 8×8 grey digit (values 0–16) is upscaled to `size`×`size` RGB and saved as a JPEG in
ImageNet's layout, `train/<digit>/*.JPEG` and `val/<digit>/*.JPEG`, with a stratified split.
A marker file records the parameters, so building again with the same ones does nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_MARKER = "demo_dataset.json"


def build_digits_dataset(
    root: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> Path:
    """Write the digits dataset under `root` (skipped if already built alike); return `root`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    params = {
        "source": "sklearn.load_digits",
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "quality": 95,
        "version": 1,
    }
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    labels = digits.target
    ids = np.arange(len(labels))
    train_ids, val_ids = train_test_split(
        ids, test_size=val_fraction, random_state=seed, stratify=labels
    )
    marker.unlink(missing_ok=True)
    for split in ("train", "val"):
        if (root / split).exists():
            shutil.rmtree(root / split)
    for split, chosen in (("train", train_ids), ("val", val_ids)):
        for i in sorted(chosen):
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC)
            img.convert("RGB").save(folder / f"digit_{i:04d}.JPEG", quality=95)
    marker.write_text(json.dumps(params))
    return root
