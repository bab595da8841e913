"""The comparison table: one row per MLflow run, columns in the paper's layout (Table 2 onward).

Error, accuracy, calibration and localisation columns are percentages (0–100), as logged, and
their headers say `(%)`. Columns other than the core ones (run, method, params, msec/batch,
final and best top-1 error) appear only when at least one run logged them, so a table of
training-only runs stays narrow and evaluated runs gain ECE, FGSM/PGD and one group of OOD
columns per OOD set.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.tables import cell, format_table

if TYPE_CHECKING:
    from mlflow.entities import Run

COMPARE_TAG = "pipeline.kind"
COMPARE_VALUE = "compare"


@dataclass(frozen=True)
class Column:
    """A table column: its header, where its value comes from, and whether it always shows."""

    key: str
    header: str
    core: bool = False


FIXED_COLUMNS = (
    Column("run", "run", core=True),
    Column("method", "method", core=True),
    Column("model", "model"),
    Column("num_params", "params", core=True),
    Column("perf/msec_per_batch", "msec/batch", core=True),
    Column("perf/images_per_s", "images/s"),
    Column("final/top1_err", "top-1 err (%)", core=True),
    Column("final/best_top1_err", "best top-1 err (%)", core=True),
    Column("final/top5_err", "top-5 err (%)"),
    Column("eval/top1_err", "eval top-1 err (%)"),
    Column("eval/ece", "ECE (%)"),
    Column("eval/fgsm_err", "FGSM err (%)"),
    Column("eval/pgd_err", "PGD err (%)"),
    Column("ref/top1_err", "authors' top-1 err then (%)"),
    Column("ref/gap", "gap to authors (% points)"),
    Column("wsol/top1_loc", "Top-1 Loc (%)"),
    Column("wsol/gt_known_loc", "GT-known Loc (%)"),
    Column("wsol/maxboxacc_v2", "MaxBoxAcc-v2 (%)"),
)
OOD_METRICS = (
    ("det_acc", "det acc"),
    ("det_acc_best", "best det acc"),
    ("auroc", "AuROC"),
    ("aupr_in", "AuPR-in"),
    ("aupr_out", "AuPR-out"),
)


def is_compare_run(run: Run) -> bool:
    """True for the runs `compare` itself logs, which must never appear as table rows."""
    return run.data.tags.get(COMPARE_TAG) == COMPARE_VALUE


def row(name: str, params: dict[str, Any], metrics: dict[str, float], run_id: str) -> dict:
    """A run's values keyed like the columns: its metrics plus name, method, model, params."""
    out: dict[str, Any] = dict(metrics)
    out["run"] = name
    out["method"] = str(params.get("method.name", ""))
    out["model"] = str(params.get("model.name", ""))
    out["layout"] = str(params.get("data.layout", ""))
    count = str(params.get("num_params", ""))
    out["num_params"] = int(count) if count.isdigit() else None
    out["run_id"] = run_id
    return out


def run_row(run: Run) -> dict[str, Any]:
    """The row of an MLflow run."""
    name = run.data.tags.get("mlflow.runName") or run.info.run_id[:8]
    return row(name, run.data.params, run.data.metrics, run.info.run_id)


def in_method_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in table order of their methods (`method_order`: the paper's, other methods after
    by name), keeping their order within a method."""
    from pipeline.tools.method_order import method_rank

    return sorted(rows, key=lambda r: method_rank(r["method"]))  # stable sort


def build_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows for every MLflow run except compare runs, in method order, then oldest first."""
    return in_method_order([run_row(r) for r in runs if not is_compare_run(r)])


def _ood_names(rows: list[dict[str, Any]]) -> list[str]:
    names = {key.split("/")[2] for row in rows for key in row if key.startswith("eval/ood/")}
    return sorted(names)


def columns_for(rows: list[dict[str, Any]]) -> list[Column]:
    """The core columns, plus every optional and OOD column that some row has a value for."""
    wanted = [c for c in FIXED_COLUMNS if c.core or any(r.get(c.key) is not None for r in rows)]
    for name in _ood_names(rows):
        for metric, label in OOD_METRICS:
            key = f"eval/ood/{name}/{metric}"
            if any(key in r for r in rows):
                wanted.append(Column(key, f"OOD {name} {label} (%)"))
    return wanted


def format_value(key: str, value: Any) -> str:
    """A cell for Markdown: parameter counts in millions, numbers to 4 significant digits."""
    if key == "num_params" and value is not None:
        return f"{value / 1e6:.2f}M"
    return cell(value) if value is None or isinstance(value, float) else str(value)


def to_markdown(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """The comparison as a Markdown table."""
    cells = ([format_value(c.key, row.get(c.key)) for c in columns] for row in rows)
    return format_table([c.header for c in columns], cells)


def to_csv(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """CSV with full-precision values (empty where a run lacks a metric) and the run id last."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.header for c in columns] + ["run_id"])
    for row in rows:
        values = [row.get(c.key) for c in columns] + [row["run_id"]]
        writer.writerow(
            ["" if v is None else repr(v) if isinstance(v, float) else v for v in values]
        )
    return out.getvalue()
