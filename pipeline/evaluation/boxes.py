"""Boxes from thresholded score maps and their IoU, with wsolevaluation's conventions.

Boxes are `[x0, y0, x1, y1]` in inclusive pixel coordinates: the area is
(x1 − x0 + 1)·(y1 − y0 + 1). wsolevaluation finds boxes with OpenCV (`cv2.threshold` on the
map scaled to uint8, `cv2.findContours(RETR_TREE)`, `cv2.boundingRect`); OpenCV is not
installed here, so the same boxes are found with `scipy.ndimage.label`:

- an outer contour of OpenCV is the border of an 8-connected foreground component; its
  bounding rectangle is the component's bounding box;
- RETR_TREE also returns the inner contour of each hole (a 4-connected background component
  that does not touch the image edge); that contour runs along the foreground pixels around
  the hole, so its rectangle is the hole's box grown by one pixel on each side;
- wsolevaluation turns a rectangle (x, y, w, h) into `[x, y, x + w, y + h]` clipped to
  `[.., width − 1, height − 1]` (one pixel wider than the inclusive box); we keep that.

"Largest contour" (wsolevaluation without multi-contour evaluation) is taken as the
component with the most pixels (OpenCV's contourArea is the polygon area of the border,
which orders components the same way except for near-ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import box_iou as _torchvision_box_iou

__all__ = ["box_iou", "boxes_from_scoremap", "resize_box"]

_EIGHT = np.ones((3, 3), dtype=bool)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix (len a × len b) of inclusive-coordinate boxes.

    torchvision's `box_iou` measures half-open boxes, so one pixel is added to x1 and y1.
    """
    a = torch.as_tensor(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))
    one = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    return _torchvision_box_iou(a + one, b + one).numpy()


def resize_box(
    box: Sequence[float], image_size: tuple[int, int], new_size: tuple[int, int]
) -> list[int]:
    """Scale a box from an image of (w, h) to one of (w', h'), truncating as wsolevaluation."""
    (w, h), (nw, nh) = image_size, new_size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [int(x0 * nw / w), int(y0 * nh / h), int(x1 * nw / w), int(y1 * nh / h)]


def _mask(scoremap: np.ndarray, threshold: float) -> np.ndarray:
    """cv2.threshold(THRESH_BINARY) on the map as uint8: pixel > int(threshold · max)."""
    image = (scoremap * 255).astype(np.uint8)
    return image > int(threshold * int(image.max()))


def _hole_boxes(mask: np.ndarray) -> list[list[int]]:
    """Rectangles of the inner contours: each enclosed background component grown by 1."""
    labels, count = ndimage.label(~mask)  # default structure: 4-connected
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    if count == int((edge > 0).sum()):  # every background component reaches the edge
        return []
    boxes = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None and index not in edge:
            ys, xs = sl
            boxes.append([xs.start - 1, ys.start - 1, xs.stop + 1, ys.stop + 1])
    return boxes


def boxes_from_scoremap(
    scoremap: np.ndarray, threshold: float, all_contours: bool = True
) -> np.ndarray:
    """Boxes (K, 4) of the contours of `scoremap` (H, W, values in [0, 1]) above a threshold.

    With `all_contours` every outer and inner contour gives a box (MaxBoxAcc-v2); otherwise
    only the largest component does. No foreground gives the single box [0, 0, 0, 0].
    """
    height, width = scoremap.shape
    mask = _mask(scoremap, threshold)
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return np.zeros((1, 4), dtype=np.int64)
    slices = ndimage.find_objects(labels)
    if not all_contours:
        largest = int(np.argmax(np.bincount(labels.ravel())[1:]))
        slices = [slices[largest]]
    boxes = [[xs.start, ys.start, xs.stop, ys.stop] for ys, xs in slices]
    if all_contours:
        boxes += _hole_boxes(mask)
    out = np.asarray(boxes, dtype=np.int64)
    np.minimum(out[:, 2], width - 1, out=out[:, 2])
    np.minimum(out[:, 3], height - 1, out=out[:, 3])
    return out
