"""The authors' published figures as a yardstick: their per-epoch curves (reference_curves/, MIT)
and the paper's ImageNet Table 2 (parameters, msec/batch on an RTX 2080 Ti, top-1 error).

A run of the same dataset (`data.layout`) and model as one of the authors' logs gets their
curve drawn under its own in `val_curves.png`, and two table columns: the authors' top-1 error
at the run's last validated epoch, and the run's gap to it in percentage points.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parent / "reference_curves"
Curve = list[tuple[int, float]]

# The paper's Table 2 (ImageNet, ResNet-50, 300 epochs): method → (parameters in millions,
# msec/batch on one RTX 2080 Ti, top-1 error %). Methods of the registry only; Co-Mixup, StyleMix
# and StyleCutMix are not built here.
TABLE2 = {
    "baseline": (25, 418, 23.68),
    "input_mixup": (25, 436, 22.58),
    "cutmix": (25, 427, 21.40),
    "manifold_mixup": (25, 441, 22.50),
    "puzzlemix": (25, 846, 21.24),
    "saliencymix": (25, 462, 21.26),
    "alignmixup": (25, 450, 20.68),
    "alignmixup_ae": (35, 688, 18.83),
}


def reference_name(layout: str, model: str) -> str:
    """The file stem of the authors' curve for a dataset layout and model name."""
    return f"{layout}_{model}"


@cache
def authors_curve(layout: str, model: str) -> tuple[tuple[int, float], ...] | None:
    """The authors' test top-1 error (%) per epoch for this setting; None if they have none."""
    path = FOLDER / f"{reference_name(layout, model)}.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return tuple(
            (int(r["epoch"]), 100.0 - float(r["test_top1_acc"])) for r in csv.DictReader(f)
        )


def add_gap(row: dict[str, Any], curve: Curve) -> dict[str, Any]:
    """`row` with `ref/top1_err` and `ref/gap` at the last epoch of `curve` (the run's val
    top-1 error history), when the authors have a curve for its setting and that epoch."""
    reference = authors_curve(str(row.get("layout", "")), str(row.get("model", "")))
    if reference is None or not curve:
        return row
    epoch, err = max(curve)
    theirs = dict(reference).get(epoch)
    if theirs is None:
        return row
    return {**row, "ref/epoch": epoch, "ref/top1_err": theirs, "ref/gap": err - theirs}


def references_for(rows: list[dict[str, Any]]) -> dict[str, Curve]:
    """The authors' curves that the runs in `rows` have a setting for, by plot label."""
    out = {}
    for row in rows:
        layout, model = str(row.get("layout", "")), str(row.get("model", ""))
        curve = authors_curve(layout, model)
        if curve is not None:
            out[f"authors: {reference_name(layout, model)}"] = list(curve)
    return out
