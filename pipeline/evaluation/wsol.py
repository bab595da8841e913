"""Class activation maps and the WSOL scores of wsolevaluation (docs/evaluation.md), in percent.

CAM of class k: Σ_c w_k,c A_c over the last feature tensor A (no bias, as wsolevaluation),
resized to the image with bicubic interpolation (wsolevaluation uses cv2.INTER_CUBIC) and
min–max normalised (a constant map becomes zeros).

- MaxBoxAcc-v2: CAM of the ground-truth class; for every CAM threshold in
  `np.arange(0, 1, 0.01)` (wsolevaluation's cam_curve_interval) every contour gives a box; an
  image counts at IoU threshold δ if some box reaches IoU ≥ δ with some ground-truth box; the
  best threshold is taken for each δ in {30, 50, 70} and the three accuracies are averaged.
- GT-known Loc: CAM of the ground-truth class at the fixed threshold (0.15), the box of the
  largest component, IoU ≥ 0.5 with some ground-truth box.
- Top-1 Loc: the same with the CAM of the predicted class, and the prediction correct. When the
  prediction is correct the predicted class is the ground-truth class, so Top-1 Loc is
  "prediction correct and GT-known correct" and needs no second CAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.evaluation.boxes import box_iou, boxes_from_scoremap

if TYPE_CHECKING:
    from pipeline.models import MixNet

__all__ = [
    "CAM_THRESHOLDS",
    "LocalizationAccumulator",
    "class_activation_maps",
    "image_ious",
    "normalize_maps",
]

CAM_THRESHOLDS = np.arange(0.0, 1.0, 0.01)


def _check_cam_model(model: MixNet, features: torch.Tensor) -> nn.Linear:
    """The linear classifier that reads the pooled features (CAM is undefined otherwise)."""
    classifier = model.classifier
    if model.has_embedding or not isinstance(classifier, nn.Linear):
        raise CheckpointError(
            "WSOL needs a model whose classifier is a linear layer on the pooled feature tensor; "
            "models with the extra layer f (AlignMixup/AE, AlignMixup mixing at e or E) classify "
            "the embedding e, so CAM is not defined for them"
        )
    if classifier.in_features != features.shape[1]:
        raise CheckpointError(
            f"classifier takes {classifier.in_features} inputs but the feature tensor has "
            f"{features.shape[1]} channels: CAM is not defined for this model"
        )
    return classifier


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min–max normalise each (H, W) map of a (B, H, W) batch to [0, 1]; constant → zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1) - low).clamp_min(0)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe, torch.zeros_like(maps))


@torch.no_grad()
def class_activation_maps(
    model: MixNet, images: torch.Tensor, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, CAMs) for normalised images (B, 3, H, W); CAMs (B, H, W) in [0, 1].

    `classes` picks the class of each map (default: the predicted class).
    """
    features = model.features(images)
    logits = model.head(features)
    classifier = _check_cam_model(model, features)
    if classes is None:
        classes = logits.argmax(dim=1)
    weights = classifier.weight[classes].float()  # (B, c)
    cams = torch.einsum("bchw,bc->bhw", features.float(), weights)
    cams = F.interpolate(cams[:, None], size=images.shape[-2:], mode="bicubic", align_corners=False)
    return logits, normalize_maps(cams[:, 0])


def image_ious(
    cam: np.ndarray,
    gt_boxes: np.ndarray,
    cam_thresholds: np.ndarray = CAM_THRESHOLDS,
    fixed_threshold: float = 0.15,
) -> tuple[np.ndarray, float]:
    """One image's ground-truth-class CAM (H, W) against its boxes (N, 4) in CAM pixels.

    Returns the best IoU at each CAM threshold over all contours and all ground-truth boxes,
    and the best IoU of the largest component's box at the fixed threshold. A plain function
    of arrays, so that `localize_model` can spread images over processes.
    """
    per_threshold = [boxes_from_scoremap(cam, t, all_contours=True) for t in cam_thresholds]
    starts = np.cumsum([0] + [len(b) for b in per_threshold[:-1]])
    best_iou = box_iou(np.concatenate(per_threshold), gt_boxes).max(axis=1)
    fixed_box = boxes_from_scoremap(cam, fixed_threshold, all_contours=False)
    return np.maximum.reduceat(best_iou, starts), float(box_iou(fixed_box, gt_boxes).max())


@dataclass
class LocalizationAccumulator:
    """Counts, image by image, what MaxBoxAcc-v2, GT-known Loc and Top-1 Loc need."""

    cam_thresholds: np.ndarray = field(default_factory=lambda: CAM_THRESHOLDS.copy())
    iou_thresholds: Sequence[int] = (30, 50, 70)
    fixed_threshold: float = 0.15
    images: int = 0
    class_correct: int = 0
    gt_known_correct: int = 0
    top1_correct: int = 0
    box_correct: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.box_correct = np.zeros((len(self.iou_thresholds), len(self.cam_thresholds)))

    def add(self, cam: np.ndarray, gt_boxes: np.ndarray, prediction_correct: bool) -> None:
        """One image: its ground-truth-class CAM (H, W), its boxes (N, 4) in CAM pixels."""
        ious = image_ious(cam, gt_boxes, self.cam_thresholds, self.fixed_threshold)
        self.add_ious(*ious, prediction_correct)

    def add_ious(
        self, best_per_threshold: np.ndarray, fixed_iou: float, prediction_correct: bool
    ) -> None:
        """One image from what `image_ious` returned for it."""
        for row, delta in enumerate(self.iou_thresholds):
            self.box_correct[row] += best_per_threshold >= delta / 100.0
        gt_known = fixed_iou >= 0.5
        self.images += 1
        self.class_correct += int(prediction_correct)
        self.gt_known_correct += int(gt_known)
        self.top1_correct += int(gt_known and prediction_correct)

    def best_thresholds(self) -> dict[int, float]:
        """The CAM threshold that gives MaxBoxAcc at each IoU threshold."""
        best = self.box_correct.argmax(axis=1)
        return {
            d: float(self.cam_thresholds[i]) for d, i in zip(self.iou_thresholds, best, strict=True)
        }

    def compute(self) -> dict[str, float]:
        """All scores in percent."""
        n = max(self.images, 1)
        max_box_acc = 100.0 * self.box_correct.max(axis=1) / n
        pairs = zip(self.iou_thresholds, max_box_acc, strict=True)
        scores = {f"maxboxacc_iou{d}": float(a) for d, a in pairs}
        scores["maxboxacc_v2"] = float(max_box_acc.mean())
        scores["gt_known_loc"] = 100.0 * self.gt_known_correct / n
        scores["top1_loc"] = 100.0 * self.top1_correct / n
        scores["top1_cls"] = 100.0 * self.class_correct / n
        return scores
