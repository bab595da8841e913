"""Evaluation metrics against hand-worked cases and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.metrics import (
    detection_accuracy_at,
    detection_accuracy_best,
    expected_calibration_error,
    ood_metrics,
    topk_errors,
)


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is `probs` (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log()


def test_ece_two_bins_by_hand():
    # Bins [0, 0.5) and [0.5, 1]. Confidences and hits:
    #   bin 0: 0.4 right, 0.4 wrong       → acc 0.5, conf 0.4, |gap| 0.1, weight 2/4
    #   bin 1: 0.9 right, 0.7 wrong       → acc 0.5, conf 0.8, |gap| 0.3, weight 2/4
    # ECE = 0.5·0.1 + 0.5·0.3 = 0.2
    probs = [[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]
    labels = torch.tensor([0, 0, 0, 0])
    assert expected_calibration_error(_logits(probs), labels, n_bins=2) == pytest.approx(20.0)


def test_ece_ignores_padding_and_is_zero_when_calibrated():
    # Two samples at confidence 0.5 (bin [0.5, 1) of 2), one right and one wrong: acc = conf.
    probs = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    labels = torch.tensor([0, 1, -1])
    assert expected_calibration_error(_logits(probs), labels, n_bins=2) == pytest.approx(0.0)


def test_topk_errors_by_hand():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4],  # label 0: top-1 right
            [9.0, 8, 7, 6, 5, 4],  # label 4: top-5 right, top-1 wrong
            [9.0, 8, 7, 6, 5, 4],  # label 5: both wrong
            [0.0, 0, 0, 0, 0, 9],  # padding
        ]
    )
    errors = topk_errors(logits, torch.tensor([0, 4, 5, -1]), (1, 5))
    assert errors[1] == pytest.approx(200 / 3)
    assert errors[5] == pytest.approx(100 / 3)


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_topk_errors_over_batches_match_torchmetrics(classes):
    """Accumulated over uneven batches with padding, against torchmetrics' accuracy on the
    whole set at once (k = 5 on 3 classes is top-3)."""
    from torchmetrics.classification import MulticlassAccuracy

    from pipeline.evaluation.metrics import TopKErrors

    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(70, classes, generator=g)
    labels = torch.randint(0, classes, (70,), generator=g)
    labels[-9:] = -1  # the val loader's padding
    errors = TopKErrors(classes, (1, 5))
    for part in (slice(0, 7), slice(7, 40), slice(40, 70)):
        errors.update(logits[part], labels[part])
    got = errors.compute()
    for k in (1, 5):
        reference = MulticlassAccuracy(classes, top_k=min(k, classes), average="micro",
                                       ignore_index=-1)(logits, labels)  # fmt: skip
        assert got[k] == pytest.approx(100 * (1 - float(reference)), abs=1e-4)


def test_topk_errors_never_read_the_device_per_batch():
    """On "meta" tensors (no values) any op that needs them (item, nonzero, unique, boolean
    indexing: each a host-device sync on a GPU) raises; `update` has none."""
    from pipeline.evaluation.metrics import TopKErrors

    errors = TopKErrors(100, (1, 5), torch.device("meta"))
    for _ in range(3):
        errors.update(
            torch.empty(16, 100, device="meta"), torch.empty(16, dtype=torch.int64, device="meta")
        )
    assert errors.hits.device.type == "meta"


def test_detection_accuracy_by_hand():
    scores_id = torch.tensor([0.9, 0.6, 0.4])
    scores_ood = torch.tensor([0.3, 0.55, 0.2, 0.1])
    # t = 0.5: TPR 2/3, TNR 3/4.
    assert detection_accuracy_at(scores_id, scores_ood, 0.5) == pytest.approx(50 * (2 / 3 + 3 / 4))
    # Best t = 0.4: TPR 1, TNR 3/4 (t = 0.6 gives 2/3 and 1; t = 0.3 gives 1 and 1/2).
    assert detection_accuracy_best(scores_id, scores_ood) == pytest.approx(87.5)


def test_auroc_and_aupr_match_scikit_learn():
    rng = np.random.default_rng(0)
    scores_id = rng.beta(5, 2, size=300)
    scores_ood = rng.beta(2, 3, size=200)
    scores = np.concatenate([scores_id, scores_ood])
    target = np.concatenate([np.ones(300), np.zeros(200)])
    got = ood_metrics(torch.from_numpy(scores_id), torch.from_numpy(scores_ood))
    assert got["auroc"] == pytest.approx(100 * roc_auc_score(target, scores), abs=1e-4)
    assert got["aupr_in"] == pytest.approx(100 * average_precision_score(target, scores), abs=1e-4)
    expected_out = 100 * average_precision_score(1 - target, -scores)
    assert got["aupr_out"] == pytest.approx(expected_out, abs=1e-4)
    assert 50 < got["auroc"] < 100 and not math.isclose(got["aupr_in"], got["aupr_out"])
