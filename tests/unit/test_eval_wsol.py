"""Boxes, IoU, CAMs and MaxBoxAcc-v2 against cases worked by hand (wsolevaluation conventions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.evaluation.boxes import box_iou, boxes_from_scoremap, resize_box
from pipeline.evaluation.wsol import LocalizationAccumulator, class_activation_maps


def test_iou_uses_inclusive_pixel_coordinates():
    a = [[0, 0, 9, 9]]  # 10 × 10 = 100 pixels
    # Overlap x, y ∈ 5..9: 25 pixels; union 100 + 100 − 25 = 175.
    assert box_iou(a, [[5, 5, 14, 14]])[0, 0] == pytest.approx(25 / 175)
    # Sharing one column (x = 9): 10 pixels of 100 + 100 − 10.
    assert box_iou(a, [[9, 0, 18, 9]])[0, 0] == pytest.approx(10 / 190)
    assert box_iou(a, [[10, 0, 19, 9]])[0, 0] == 0.0  # adjacent, no shared pixel
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0  # one pixel is a box of area 1
    assert box_iou(a, [[0, 0, 9, 9], [0, 0, 4, 9]]).shape == (1, 2)


def test_resize_box_truncates_like_wsolevaluation():
    # 500 × 335 image to 224 × 224: x scales by 0.448, y by 0.6687 (truncated, not rounded).
    assert resize_box((60, 27, 385, 331), (500, 335), (224, 224)) == [26, 18, 172, 221]


def _two_blobs() -> np.ndarray:
    m = np.zeros((20, 30))
    m[2:6, 3:9] = 1.0  # 24 pixels, inclusive box x 3..8, y 2..5
    m[10:16, 20:26] = 0.6  # 36 pixels, x 20..25, y 10..15
    return m


def test_two_blobs_give_two_boxes_one_pixel_wider_as_cv2_bounding_rect():
    # cv2.boundingRect gives (x, y, w, h); wsolevaluation writes [x, y, x + w, y + h].
    boxes = boxes_from_scoremap(_two_blobs(), 0.5)
    assert sorted(boxes.tolist()) == [[3, 2, 9, 6], [20, 10, 26, 16]]


def test_threshold_is_strictly_above_int_threshold_times_max_on_uint8():
    # 0.6 → uint8 153; at t = 0.6, int(0.6 · 255) = 153 and 153 > 153 is false: blob gone.
    assert boxes_from_scoremap(_two_blobs(), 0.59).tolist() == [[3, 2, 9, 6], [20, 10, 26, 16]]
    assert boxes_from_scoremap(_two_blobs(), 0.6).tolist() == [[3, 2, 9, 6]]


def test_largest_component_only_when_asked():
    assert boxes_from_scoremap(_two_blobs(), 0.5, all_contours=False).tolist() == [[20, 10, 26, 16]]


def test_hole_gives_an_inner_contour_box_and_edges_are_clipped():
    m = np.zeros((12, 14))
    m[2:9, 2:9] = 1.0  # ring: pixels 2..8
    m[4:7, 4:7] = 0.0  # hole: pixels 4..6; its inner contour runs on pixels 3..7
    m[0:3, 13] = 1.0  # a bar on the right edge: x = 13, y 0..2 → [13, 0, 14, 3], x1 clipped to 13
    boxes = sorted(boxes_from_scoremap(m, 0.5).tolist())
    assert boxes == [[2, 2, 9, 9], [3, 3, 8, 8], [13, 0, 13, 3]]


def test_empty_map_gives_the_zero_box():
    assert boxes_from_scoremap(np.zeros((8, 8)), 0.3).tolist() == [[0, 0, 0, 0]]


def _image_one() -> tuple[np.ndarray, np.ndarray]:
    """Plateau 0.5 on pixels 2..13, peak 1.0 on 5..9; ground truth is the peak."""
    m = np.zeros((20, 20))
    m[2:14, 2:14] = 0.5
    m[5:10, 5:10] = 1.0
    return m, np.array([[5, 5, 9, 9]])


def _image_two() -> tuple[np.ndarray, np.ndarray]:
    """A large decoy (81 px, 1.0) and the object (64 px, 0.8); ground truth is the object."""
    m = np.zeros((20, 20))
    m[0:9, 0:9] = 1.0
    m[10:18, 10:18] = 0.8
    return m, np.array([[10, 10, 17, 17]])


def test_maxboxacc_v2_by_hand():
    # Image 1: t < 0.50 → plateau box [2,2,14,14]: IoU 25/169 = 0.15 (fails all δ);
    #          t ≥ 0.50 → peak box [5,5,10,10]: IoU 25/36 = 0.694 (passes 30 and 50, not 70).
    # Image 2: t < 0.80 → decoy and object boxes; object [10,10,18,18]: IoU 64/81 = 0.79
    #          (passes every δ); t ≥ 0.80 → decoy only: IoU 0.
    # Images (1, right), (2, right), (1, wrong). Correct counts over t:
    #   δ = 30, 50: t < 0.5 → 1, 0.5 ≤ t < 0.8 → 3, t ≥ 0.8 → 2   ⇒ 100 %, best t = 0.50
    #   δ = 70:     t < 0.8 → 1 (image 2), else 0                 ⇒ 33.3 %
    # At the fixed t = 0.6 with the largest component: image 1 → peak, IoU 0.694 (right);
    # image 2 → the decoy, IoU 0 (wrong). GT-known 2/3; Top-1 Loc 1/3 (third was misclassified).
    acc = LocalizationAccumulator(fixed_threshold=0.6)
    for (cam, gt), correct in ((_image_one(), True), (_image_two(), True), (_image_one(), False)):
        acc.add(cam, gt, correct)
    scores = acc.compute()
    assert scores["maxboxacc_iou30"] == pytest.approx(100.0)
    assert scores["maxboxacc_iou50"] == pytest.approx(100.0)
    assert scores["maxboxacc_iou70"] == pytest.approx(100 / 3)
    assert scores["maxboxacc_v2"] == pytest.approx((100 + 100 + 100 / 3) / 3)
    assert scores["gt_known_loc"] == pytest.approx(200 / 3)
    assert scores["top1_loc"] == pytest.approx(100 / 3)
    assert scores["top1_cls"] == pytest.approx(200 / 3)
    assert acc.best_thresholds()[50] == pytest.approx(0.5)


class _FixedFeatures(nn.Module):
    """A 'model' whose feature tensor is given, with a linear classifier (for CAM by hand)."""

    has_embedding = False  # MixNet's flag: it classifies the pooled features, not an f

    def __init__(self, features: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.a = features
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.a

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.classifier(a.mean(dim=(2, 3)))


def test_cam_is_the_class_weighted_sum_of_channels_min_max_normalised():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    weight = torch.tensor([[1.0, -1.0], [0.0, 3.0]])
    model = _FixedFeatures(a, weight)
    # Class 0: A0 − A1 = [[-3, 2], [3, 4]] → (v + 3) / 7. Image as large as the map: no resize.
    _, cams = class_activation_maps(model, torch.zeros(1, 3, 2, 2), torch.tensor([0]))
    torch.testing.assert_close(cams[0], torch.tensor([[0.0, 5 / 7], [6 / 7, 1.0]]))
    # Class 1 reads 3·A1 = [[12, 0], [0, 0]]; default class = predicted (pooled logits: channel
    # means 2.5 and 1 give 2.5 − 1 = 1.5 for class 0 and 3 for class 1).
    logits, cams = class_activation_maps(model, torch.zeros(1, 3, 2, 2))
    assert logits.argmax().item() == 1
    torch.testing.assert_close(cams[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("method", ["alignmixup_ae", "alignmixup"])
def test_cam_is_refused_for_models_that_classify_an_embedding(method):
    """The AE, and AlignMixup with the extra layer f (level e), classify e = f(A), not A."""
    from pipeline.config import AEConfig, ModelConfig
    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe

    settings = load_recipe(None, [f"method.name={method}", "method.mix_levels=[x,e]"]).method
    ae = AEConfig(embed_channels=8, decoder_width=8, decoder_min_width=8, decoder_blocks=1)
    model = build_method(settings).build_model(ModelConfig(name="test_resnet", ae=ae), 2)
    with pytest.raises(CheckpointError, match="AlignMixup/AE, AlignMixup mixing at e"):
        class_activation_maps(model.eval(), torch.zeros(1, 3, 64, 64))
