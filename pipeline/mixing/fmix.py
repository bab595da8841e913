"""FMix (Harris et al., 2020): a binary mask cut from a random low-frequency image.

A grey image whose Fourier amplitudes fall off as 1/f^δ is smooth: its bright part is a few
large, irregular blobs. Thresholding it so that a share λ of the pixels is 1 gives a mask that
keeps λ of the image, in shapes that are neither boxes (CutMix) nor pixel noise. The mask is
drawn on the CPU from a `torch.Generator` (a resumed step draws the same mask) and moved to the
images' device once per batch; it is the same for every sample of the batch, as in the
authors' code (ecs-vlc/FMix, `fmix.py`).
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from pipeline.mixing.basic import _check_perm, check_lam

__all__ = ["fmix", "fmix_mask", "low_frequency_image"]


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if (
        len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or min(shape) < 1
    ):
        raise ValueError(f"shape must be (height, width), two positive ints; got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_decay(decay_power: float) -> float:
    if not isinstance(decay_power, Real) or not decay_power > 0:
        raise ValueError(f"decay_power must be a number > 0, got {decay_power!r}")
    return float(decay_power)


def low_frequency_image(
    shape: tuple[int, int], decay_power: float = 3.0, generator: torch.Generator | None = None
) -> Tensor:
    """A random real (H, W) float64 image whose spectrum decays as 1/f^δ (δ = `decay_power`).

    Each coefficient of the half-spectrum that `irfft2` reads (H × (W//2 + 1)) gets independent
    standard-normal real and imaginary parts, drawn on the CPU from `generator`, scaled by
    1 / max(f, 1/max(H, W))^δ, where f = √(fy² + fx²) is the frequency in cycles per pixel (the
    floor keeps the zero frequency finite, as the authors do). The inverse real FFT gives the
    image. Only the order of its pixel values matters to `fmix_mask`, so it is not rescaled.
    """
    height, width = _check_shape(shape)
    decay = _check_decay(decay_power)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fy * fy + fx * fx).clamp_min(1.0 / max(height, width))
    parts = torch.randn((2, *freq.shape), generator=generator, dtype=torch.float64)
    spectrum = torch.complex(parts[0], parts[1]) / freq**decay
    return torch.fft.irfft2(spectrum, s=(height, width))


def fmix_mask(
    lam: float,
    shape: tuple[int, int],
    decay_power: float = 3.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A binary (H, W) float32 CPU mask: the round(λ·H·W) brightest pixels of a
    `low_frequency_image` are 1, the rest 0.

    Its mean is round(λHW)/HW, within 1/(2HW) of λ. (The authors round up or down at random,
    with Python's global `random`; rounding to nearest keeps every draw on `generator`.)
    """
    lam = check_lam(lam)
    height, width = _check_shape(shape)
    image = low_frequency_image((height, width), decay_power, generator)
    ones = min(max(round(lam * height * width), 0), height * width)
    mask = torch.zeros(height * width, dtype=torch.float32)
    if ones:
        mask[torch.topk(image.flatten(), ones).indices] = 1.0
    return mask.view(height, width)


def fmix(
    x: Tensor,
    perm: Tensor,
    lam: float,
    decay_power: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """FMix on (B, C, H, W): x where the `fmix_mask` is 1, x[π] where it is 0; → (mixed, λ_mask).

    λ_mask is the mask's mean (the share of each image that is still its own), which is what
    the labels should be weighted by; the authors weight them by the drawn λ instead (the two
    differ by less than 1/HW). Pixels are selected, not blended, so the result is exact in any
    dtype.
    """
    lam = check_lam(lam)
    if x.dim() != 4:
        raise ValueError(f"fmix expects a 4-D (B, C, H, W) batch, got shape {tuple(x.shape)}")
    _check_perm(perm, x.shape[0])
    height, width = x.shape[-2:]
    mask = fmix_mask(lam, (height, width), decay_power, generator)
    lam_mask = float(mask.sum()) / (height * width)
    keep = mask.to(torch.bool)
    if x.device.type == "cuda":
        keep = keep.pin_memory().to(x.device, non_blocking=True)  # no sync (see sample_mix)
    else:
        keep = keep.to(x.device)
    mixed = torch.where(keep, x, x[perm])
    return mixed, lam_mask
