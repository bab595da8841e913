"""Classification, calibration and OOD-detection metrics (docs/evaluation.md), all in percent.

Library metrics come from torchmetrics (ECE, AuROC, average precision, ROC). Written here: the
top-k errors accumulated during validation (`TopKErrors`: torchmetrics' accuracy syncs the device
every batch), and the two detection accuracies, because no library defines them: both are
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
    """Top-k error (%) accumulated over batches; padded samples (label −1) do not count. k is
    capped at the number of classes but keeps its key (k = 5 on a 3-class set is top-3).

    Written here rather than with torchmetrics' MulticlassAccuracy: its `ignore_index` drops
    the padded samples by boolean indexing, and its argument checks call `torch.unique`, each a
    host-device sync per batch. Here the counts stay on the device (a few small ops per batch)
    and `compute()` reads them once, after summing them over the ranks under DDP.
    """

    def __init__(
        self, num_classes: int, ks: tuple[int, ...] = (1, 5), device: torch.device | None = None
    ) -> None:
        self.ks = tuple(ks)
        self.depth = [min(k, num_classes) for k in ks]  # how many of the top classes count
        self.hits = torch.zeros(len(ks), dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels >= 0
        top = logits.topk(max(self.depth), dim=1).indices  # (B, k_max), best first
        found = (top == labels[:, None]).cumsum(1) > 0  # [i, j]: label among the j + 1 best
        self.hits += (found[:, [d - 1 for d in self.depth]] & valid[:, None]).sum(0)
        self.count += valid.sum()

    def compute(self) -> dict[int, float]:
        totals = torch.cat([self.hits, self.count])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.clone()
            torch.distributed.all_reduce(totals)
        *hits, count = totals.tolist()  # the one read from the device
        if count == 0:
            return {k: float("nan") for k in self.ks}
        return {k: 100.0 * (1.0 - h / count) for k, h in zip(self.ks, hits, strict=True)}


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
