"""The recipe's augmentation, drawn per sample from a seed, and the steps both backends share.

The authors' ImageNet training transform is RandomResizedCrop, horizontal flip, ColorJitter
(brightness/contrast/saturation 0.4), ToTensor, PCA lighting (alphastd 0.1), Normalize. Its
random parameters are drawn here with torchvision's own `get_params` under a generator seeded
per sample (see sharding.py), so the torchvision and DALI loaders crop the same windows and a
resumed run repeats the augmentation of the run it continues. Lighting adds one RGB shift per
image, so both backends fold it into the per-sample mean of their normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

    from pipeline.config import DataConfig

# PCA of ImageNet RGB pixels in [0, 1], as in the authors' `Lighting` transform (fb.resnet.torch).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


@dataclass(frozen=True)
class TrainParams:
    """One sample's augmentation: crop box, flip, colour factors and their order, lighting."""

    crop: tuple[int, int, int, int]  # top, left, height, width in the decoded image
    flip: bool
    jitter_order: tuple[int, ...]  # torchvision ColorJitter order: 0 brightness, 1 contrast, 2 sat.
    brightness: float
    contrast: float
    saturation: float
    alpha: tuple[float, float, float]  # lighting coefficients, N(0, lighting²)


def draw_train_params(seed: int, size: tuple[int, int], cfg: DataConfig) -> TrainParams:
    """Draw a sample's parameters from `seed` for an image of `size` (w, h), torchvision's way."""
    import torch
    from torchvision.transforms import ColorJitter, RandomResizedCrop

    w, h = int(size[0]), int(size[1])
    # get_params only reads the image's shape; an expanded 1-element tensor carries it for free.
    shape_only = torch.empty(1, 1, 1).expand(3, h, w)
    cj = cfg.color_jitter
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        crop = RandomResizedCrop.get_params(shape_only, list(cfg.crop_area), list(cfg.crop_ratio))
        flip = bool(cfg.flip and torch.rand(1).item() < 0.5)
        order, b, c, s = (0, 1, 2), 1.0, 1.0, 1.0
        if cj > 0:
            rng = [max(0.0, 1 - cj), 1 + cj]
            idx, b, c, s, _ = ColorJitter.get_params(rng, rng, rng, None)
            order = tuple(int(i) for i in idx if int(i) < 3)
        alpha = (0.0, 0.0, 0.0)
        if cfg.lighting > 0:
            alpha = tuple(torch.empty(3).normal_(0, cfg.lighting).tolist())
    return TrainParams(tuple(int(v) for v in crop), flip, order, b, c, s, alpha)  # type: ignore[arg-type]


def train_pil(img: Image, p: TrainParams, cfg: DataConfig) -> Image:
    """Crop, resize, flip and colour-jitter a PIL image with drawn parameters (torchvision ops)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    size = [cfg.train_size, cfg.train_size]
    img = F.resized_crop(img, *p.crop, size, InterpolationMode.BILINEAR, antialias=True)
    if p.flip:
        img = F.hflip(img)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    factors = (p.brightness, p.contrast, p.saturation)
    for i in p.jitter_order if cfg.color_jitter > 0 else ():
        img = adjust[i](img, factors[i])
    return img


def val_pil(img: Image, cfg: DataConfig) -> Image:
    """Resize the shorter side to val_resize, centre-crop val_crop (torchvision ops)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img, cfg.val_resize, InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(img, cfg.val_crop)


def _centre_offset(size: int, crop: int) -> int:
    """torchvision's CenterCrop corner on one axis; negative when it pads (crop > size)."""
    if crop > size:
        return -((crop - size) // 2)
    return round((size - crop) / 2.0)


def val_geometry(size: tuple[int, int], resize: int, crop: int) -> tuple[int, int, int, int]:
    """(resized w, resized h, crop top, crop left) exactly as torchvision's Resize/CenterCrop.

    Needed by the DALI val pipeline so its resize and crop land on the same pixels.
    """
    w, h = int(size[0]), int(size[1])
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    return new_w, new_h, _centre_offset(new_h, crop), _centre_offset(new_w, crop)


def lighting_rgb(alpha: tuple[float, float, float]) -> tuple[float, float, float]:
    """PCA lighting: the RGB shift eigvec · (alpha ⊙ eigval) added to every pixel in [0, 1]."""
    return tuple(
        sum(IMAGENET_EIGVEC[i][j] * alpha[j] * IMAGENET_EIGVAL[j] for j in range(3))
        for i in range(3)
    )  # type: ignore[return-value]


def shifted_mean(
    mean: tuple[float, float, float], alpha: tuple[float, float, float]
) -> tuple[float, float, float]:
    """The mean that folds lighting into normalisation: ((x + rgb) − m)/s = (x − (m − rgb))/s.

    Both backends normalise each sample with this mean, so lighting costs no extra pass.
    """
    rgb = lighting_rgb(alpha)
    return tuple(m - r for m, r in zip(mean, rgb, strict=True))  # type: ignore[return-value]


def normalize(img: Image, mean: tuple[float, float, float], std: tuple[float, float, float]):
    """PIL image → float32 CHW tensor, [0, 1] pixels normalised with (mean, std)."""
    from torchvision.transforms import functional as F

    return F.normalize(F.to_tensor(img), list(mean), list(std), inplace=True)


def unnormalize(images, mean: Sequence[float], std: Sequence[float]):
    """Normalised (..., 3, H, W) images back to [0, 1] pixels (for attacks and pictures); the
    clamp removes rounding only."""
    import torch

    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp_(0.0, 1.0)
