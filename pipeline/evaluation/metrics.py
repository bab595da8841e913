"""Classification, calibration and OOD-detection metrics (docs/evaluation.md), all in percent.

Library metrics come from torchmetrics (top-k accuracy, ECE, AuROC, average precision, ROC);
only the two detection accuracies are written here, because no library defines them: both are
the balanced accuracy 0.5·(TPR + TNR) of the rule "in-distribution iff score ≥ t", once at the
paper's fixed t = 0.5 (Hendrycks & Gimpel baseline, as the AlignMixup paper reports it) and
once at the best t (the "detection accuracy" of ODIN and later OOD papers).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
    multiclass_calibration_error,
)

__all__ = [
    "TopKErrors",
    "detection_accuracy_at",
    "detection_accuracy_best",
    "expected_calibration_error",
    "max_softmax",
    "ood_metrics",
    "topk_errors",
]


def _valid(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padded samples (label −1, as the val loader pads its last batch)."""
    keep = labels >= 0
    return logits[keep].float(), labels[keep].long()


class TopKErrors:
    """Top-k error (%) accumulated over batches; padded samples (label −1) do not count. Under
    DDP, torchmetrics sums the counts over ranks at `compute()`. k is capped at the number of
    classes but keeps its key (k = 5 on a 3-class set is top-3)."""

    def __init__(
        self, num_classes: int, ks: tuple[int, ...] = (1, 5), device: torch.device | None = None
    ) -> None:
        from torchmetrics.classification import MulticlassAccuracy

        self.accuracy = {
            k: MulticlassAccuracy(
                num_classes, top_k=min(k, num_classes), average="micro", ignore_index=-1
            ).to(device or "cpu")
            for k in ks
        }

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for metric in self.accuracy.values():
            metric.update(logits, labels)

    def compute(self) -> dict[int, float]:
        return {k: 100.0 * (1.0 - float(m.compute())) for k, m in self.accuracy.items()}


def topk_errors(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Top-k error (%) of one set of logits, for each k (see `TopKErrors`)."""
    errors = TopKErrors(logits.shape[1], ks, logits.device)
    errors.update(logits.float(), labels.long())
    return errors.compute()


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    """ECE (%) of the top-1 confidence over `n_bins` equal-width bins (L1, weighted by count)."""
    logits, labels = _valid(logits, labels)
    probs = logits.softmax(dim=1)
    ece = multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
    )
    return 100.0 * ece.item()


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The OOD score of Hendrycks & Gimpel: the largest softmax probability (high = in-dist)."""
    return logits.float().softmax(dim=1).amax(dim=1)


def _pooled(scores_id: torch.Tensor, scores_ood: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of both sets in one tensor with target 1 for in-distribution, 0 for OOD."""
    scores = torch.cat([scores_id.float(), scores_ood.float()])
    target = torch.cat(
        [
            torch.ones(len(scores_id), dtype=torch.long),
            torch.zeros(len(scores_ood), dtype=torch.long),
        ]
    )
    return scores, target


def detection_accuracy_at(
    scores_id: torch.Tensor, scores_ood: torch.Tensor, threshold: float = 0.5
) -> float:
    """Balanced detection accuracy (%) of "in-distribution iff score ≥ threshold"."""
    tpr = (scores_id.float() >= threshold).float().mean()
    tnr = (scores_ood.float() < threshold).float().mean()
    return 100.0 * 0.5 * (tpr + tnr).item()


def detection_accuracy_best(scores_id: torch.Tensor, scores_ood: torch.Tensor) -> float:
    """Best balanced detection accuracy (%) over all thresholds, from torchmetrics' ROC."""
    scores, target = _pooled(scores_id, scores_ood)
    fpr, tpr, _ = binary_roc(scores, target)
    return 100.0 * (0.5 * (tpr + 1.0 - fpr)).max().item()


def ood_metrics(scores_id: torch.Tensor, scores_ood: torch.Tensor) -> dict[str, float]:
    """Detection accuracies, AuROC, AuPR-in and AuPR-out (%) for max-softmax scores in [0, 1].

    AuPR-in takes in-distribution as positive with the score itself; AuPR-out takes OOD as
    positive with `1 − score`, which ranks like −score but stays in [0, 1] (torchmetrics would
    otherwise pass scores outside [0, 1] through a sigmoid).
    """
    scores, target = _pooled(scores_id, scores_ood)
    return {
        "det_acc": detection_accuracy_at(scores_id, scores_ood, 0.5),
        "det_acc_best": detection_accuracy_best(scores_id, scores_ood),
        "auroc": 100.0 * binary_auroc(scores, target).item(),
        "aupr_in": 100.0 * binary_average_precision(scores, target).item(),
        "aupr_out": 100.0 * binary_average_precision(1.0 - scores, 1 - target).item(),
    }
