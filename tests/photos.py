"""Photos for tests and benchmarks: 224 px crops of scikit-learn's two sample images, and
smooth synthetic ones where scikit-learn is not installed (GPU machines, docs/gpu.md)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photo_batch(n: int, seed: int = 0) -> torch.Tensor:
    """`n` normalised 224 × 224 crops (n, 3, 224, 224) of china.jpg and flower.jpg, alternately,
    at positions drawn from `seed`."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two 427 × 640 photos
    crops = []
    for i in range(n):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 224), rng.integers(0, photo.shape[1] - 224)
        crops.append(photo[y : y + 224, x : x + 224])
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


def synthetic_photo(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A smooth RGB image (width, height) of sinusoidal gradients: compresses like a photo,
    unlike noise, so decoders and resizers are exercised as on real images."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [
        127 + 100 * np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y * rng.uniform(0.5, 2) + k)
        for k in range(3)
    ]
    return Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8))
