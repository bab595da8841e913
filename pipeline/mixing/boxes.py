"""Box-shaped rivals of CutMix: SaliencyMix's box around the partner's saliency peak, and
ResizeMix's whole partner image shrunk into a box (docs/mixing.md).

SaliencyMix (Uddin et al., ICLR 2021; github.com/afm-shahab-uddin/SaliencyMix) moves CutMix's
box from a random place to the most salient pixel of the source image, so the pasted patch is
more likely to hold the object its label names. ResizeMix (Qin et al., 2020, arXiv:2012.11101)
pastes the whole source image, resized, so the patch always holds the object and its label
weight is exactly its area.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.mixing.basic import _check_perm, check_lam

__all__ = [
    "Box",
    "paste_boxes",
    "resizemix",
    "saliency_box",
    "saliency_boxes",
    "saliency_map",
    "saliencymix",
]

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1): rows y0..y1−1, columns x0..x1−1


def _check_batch(x: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} expects a 4-D (B, C, H, W) batch, got shape {tuple(x.shape)}")


def saliency_map(image: Tensor) -> Tensor:
    """OpenCV's static fine-grained saliency of one (C, H, W) image, C = 1 or 3, on any device;
    → an (H, W) float32 CPU tensor in [0, 1] (1 at the most salient pixels).

    OpenCV's detector (Montabone & Soto's center-surround intensity differences over six
    neighbourhood sizes, opencv-contrib `cv2.saliency`) reads 8-bit pixels, and the images here
    arrive normalised with a mean and std this function does not know. So the image is scaled
    to 0..255 by its own minimum and maximum, over all channels at once: the detector only
    compares intensities of the grey image (a fixed positive combination of the channels) with
    the means around them, so one positive affine rescale of the whole image keeps its
    differences in proportion, and with them where the peak is; only the rounding to 8 bits is
    new. (The authors pass the normalised float image straight to OpenCV, whose detector then
    reads the bytes of the float32 values as if they were 8-bit pixels; docs/mixing.md.) A
    3-channel image is handed over in BGR order, as OpenCV expects, so its grey weights fall on
    the right channels of an RGB batch. A constant image has no peak: its map is all zeros.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3) or min(image.shape[1:]) < 1:
        raise ValueError(
            f"saliency_map expects one (C, H, W) image with C = 1 or 3, got shape "
            f"{tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise ValueError(f"saliency_map expects a floating-point image, got {image.dtype}")
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            "SaliencyMix needs OpenCV's saliency module: pip install opencv-contrib-python-headless"
        ) from exc
    # NumPy for these few element-wise steps on one small CPU image: torch's intra-op thread
    # pool only adds waiting here (measured 100× slower on a busy 2-core host).
    pixels = image.detach().to("cpu", torch.float32).numpy().astype(np.float64)
    low, high = pixels.min(), pixels.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("saliency_map expects finite pixel values")
    if high <= low:
        return torch.zeros(image.shape[1:], dtype=torch.float32)
    scaled = np.rint((pixels - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    if scaled.shape[0] == 3:
        scaled = scaled[::-1]  # RGB → BGR
    array = np.ascontiguousarray(scaled.transpose(1, 2, 0))
    if array.shape[2] == 1:
        array = array[:, :, 0]
    ok, saliency = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(array)
    if not ok:  # pragma: no cover - OpenCV's detector always reports success
        raise RuntimeError("OpenCV's fine-grained saliency failed")
    saliency = np.asarray(saliency)
    if saliency.dtype == np.uint8:  # older opencv-contrib builds: 0..255; newer: float32 0..1
        saliency = saliency.astype(np.float32) / 255.0
    return torch.from_numpy(saliency.astype(np.float32, copy=True))


def saliency_box(saliency: Tensor, lam: float) -> Box:
    """CutMix's box for λ centred on the peak of an (H, W) saliency map: `(y0, y1, x0, x1)`.

    The peak is the first maximum in row-major order (`argmax`); the sides are
    `int(H·√(1−λ))` and `int(W·√(1−λ))`, with `cut // 2` on each side of the peak, clipped to
    the image: the authors' `saliency_bbox` and CutMix's `rand_bbox` with the centre moved.
    """
    lam = check_lam(lam)
    if saliency.dim() != 2 or min(saliency.shape) < 1:
        raise ValueError(
            f"saliency_box expects an (H, W) saliency map, got shape {tuple(saliency.shape)}"
        )
    height, width = saliency.shape
    peak = int(torch.argmax(saliency.flatten()))
    cy, cx = divmod(peak, width)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def saliency_boxes(x: Tensor, perm: Tensor, lam: float, per_image: bool = False) -> list[Box]:
    """The SaliencyMix boxes for a batch: one per sample, each around its partner's peak.

    By default (`per_image=False`) all B boxes are the one box of the first partner, x[π[0]],
    as in the authors' training scripts (`saliency_bbox(input[rand_index[0]], lam)`): one
    OpenCV call per batch. With `per_image=True` each sample gets the box of its own partner
    (what the paper describes; B OpenCV calls). Either way the partner images are copied to the
    CPU, which waits for the device.
    """
    lam = check_lam(lam)
    _check_batch(x, "saliency_boxes")
    _check_perm(perm, x.shape[0])
    if not per_image:
        box = saliency_box(saliency_map(x[int(perm[0])]), lam)
        return [box] * x.shape[0]
    partners = x.detach()[perm].to("cpu")
    return [saliency_box(saliency_map(image), lam) for image in partners]


def paste_boxes(x: Tensor, perm: Tensor, boxes: list[Box]) -> tuple[Tensor, Tensor]:
    """Box i of x[π] pasted into sample i of x; → (mixed, λ), λ a (B,) float64 CPU tensor (read
    without waiting for the device), λ_i = 1 − area of box i / HW, the share of sample i that
    is still its own.
    """
    _check_batch(x, "paste_boxes")
    _check_perm(perm, x.shape[0])
    batch, _, height, width = x.shape
    if len(boxes) != batch:
        raise ValueError(f"paste_boxes expects {batch} boxes (one per sample), got {len(boxes)}")
    for y0, y1, x0, x1 in boxes:
        if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
            raise ValueError(
                f"box (y0, y1, x0, x1) = {(y0, y1, x0, x1)} is not inside {height} × {width}"
            )
    areas = torch.tensor([(y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes], dtype=torch.float64)
    lam = 1.0 - areas / (height * width)
    if all(box == boxes[0] for box in boxes):
        y0, y1, x0, x1 = boxes[0]
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        return mixed, lam
    inside = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        inside[i, :, y0:y1, x0:x1] = True
    return torch.where(inside.to(x.device), x[perm], x), lam


def saliencymix(
    x: Tensor, perm: Tensor, lam: float, per_image: bool = False
) -> tuple[Tensor, float | Tensor]:
    """SaliencyMix on (B, C, H, W): the box of `saliency_boxes` cut from x[π] and pasted into x
    at the same place; → (mixed, λ_box).

    λ_box = 1 − box area / HW (the box is clipped at the border, so it is often smaller than
    (1−λ)HW): a float for the one batch box, a (B,) tensor on x's device with `per_image`.
    """
    boxes = saliency_boxes(x, perm, lam, per_image)
    mixed, lam_box = paste_boxes(x, perm, boxes)
    return mixed, (lam_box.to(x.device, torch.float32) if per_image else float(lam_box[0]))


def resizemix(
    x: Tensor,
    perm: Tensor,
    scale: float,
    generator: torch.Generator | None = None,
    interpolation: str = "bilinear",
) -> tuple[Tensor, float]:
    """ResizeMix on (B, C, H, W): every partner image x[π] resized whole to an h × w patch,
    h = round(τH), w = round(τW) (τ = `scale`, at least 1 pixel), and pasted into x with its
    top-left corner drawn from `generator` so that the patch lies entirely inside the image;
    → (mixed, λ_area), λ_area = 1 − h·w / (H·W) exactly.

    `interpolation`: "bilinear" (antialiased, so a shrunk image is averaged rather than
    sampled: what a resize of the picture means) or "nearest" (OpenMixup's default: one source
    pixel per patch pixel). The resize runs in float32; the patch is cast back to x's dtype.
    """
    if not isinstance(scale, Real) or not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    _check_batch(x, "resizemix")
    _check_perm(perm, x.shape[0])
    height, width = x.shape[-2:]
    h = min(max(round(scale * height), 1), height)
    w = min(max(round(scale * width), 1), width)
    y0 = int(torch.randint(height - h + 1, (1,), generator=generator))
    x0 = int(torch.randint(width - w + 1, (1,), generator=generator))
    source = x[perm].float()
    if interpolation == "bilinear":
        patch = F.interpolate(
            source, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
    else:
        patch = F.interpolate(source, size=(h, w), mode="nearest")
    mixed = x.clone()
    mixed[:, :, y0 : y0 + h, x0 : x0 + w] = patch.to(x.dtype)
    return mixed, 1.0 - (h * w) / (height * width)
