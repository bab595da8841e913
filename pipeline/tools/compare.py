"""`python -m pipeline compare`: the runs of one MLflow experiment side by side.

Writes `comparison.md`, `comparison.csv`, `val_curves.png` and `error_vs_time.png` to the output
folder and logs them as artifacts of one run named `compare` in the experiment
`<experiment>/compare` (created on first use; the run is tagged `pipeline.kind=compare` and
reused on every re-run), so the comparison stays out of the training runs' table and charts.
`--runs DIR ...` compares run folders from their tracking journals instead, without MLflow
(runs trained with `tracking.enabled: false`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

VAL_METRIC = "val/top1_err"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` command."""
    p = subparsers.add_parser(
        "compare",
        help="compare the MLflow runs of an experiment (table, curves, error vs time)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--experiment", default="alignmixup", help="MLflow experiment (default: %(default)s)"
    )
    p.add_argument(
        "--output-dir", default="compare_results", type=Path, help="default: %(default)s"
    )
    p.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    p.add_argument("--no-mlflow", action="store_true", help="write files only, log no compare run")
    p.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="compare these run folders from their journals, without MLflow",
    )
    p.set_defaults(func=run_command)


def compare_experiment(experiment: str) -> str:
    """The experiment that holds `experiment`'s compare run, apart from the runs it compares."""
    return f"{experiment}/compare"


def _compare_run_id(client: MlflowClient, experiment: str, uri: str) -> str:
    """The compare run of `experiment`, created on first use so that re-runs add no runs; a
    reused one gets this run's provenance (commit, diff, command) with its new artifacts."""
    from pipeline.runs import provenance, store
    from pipeline.runs.store import experiment_id
    from pipeline.runs.tracking import DESCRIPTION_TAG, UNITS_NOTE
    from pipeline.tools.compare_table import COMPARE_TAG, COMPARE_VALUE, is_compare_run

    exp_id = experiment_id(compare_experiment(experiment), uri)
    existing = [r for r in store.all_runs(client, exp_id) if is_compare_run(r)]
    if existing:
        run = existing[-1]
        dirty = run.data.tags.get(provenance.DIRTY_TAG) == "true"
        provenance.refresh(client, run.info.run_id, dirty_before=dirty)
        return run.info.run_id
    tags = {
        COMPARE_TAG: COMPARE_VALUE,
        "pipeline.compared_experiment": experiment,
        DESCRIPTION_TAG: UNITS_NOTE,
    }
    run_id = provenance.new_run(client, exp_id, "compare", tags)
    client.set_terminated(run_id)
    return run_id


def write_comparison(
    rows: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]], output_dir: Path
) -> dict[str, Path]:
    """The table (Markdown, CSV) and plots of `rows`; the written files by kind."""
    from pipeline.tools import compare_plots, compare_table, reference

    rows = [reference.add_gap(r, curves.get(r["run"], [])) for r in rows]
    columns = compare_table.columns_for(rows)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": output_dir / "comparison.md", "csv": output_dir / "comparison.csv"}
    files["markdown"].write_text(compare_table.to_markdown(rows, columns))
    files["csv"].write_text(compare_table.to_csv(rows, columns))
    plots = {
        "val_curves": compare_plots.plot_val_curves(
            curves, output_dir / "val_curves.png", reference.references_for(rows)
        ),
        "error_vs_time": compare_plots.plot_error_vs_time(rows, output_dir / "error_vs_time.png"),
    }
    files.update({k: v for k, v in plots.items() if v is not None})
    return files


def compare(
    experiment: str, output_dir: Path, tracking_uri: str | None = None, log: bool = True
) -> dict[str, Path]:
    """Build the table and plots for `experiment`; returns the written files by kind."""
    from pipeline.runs import store
    from pipeline.runs.store import resolve_tracking_uri
    from pipeline.tools import compare_table

    uri = resolve_tracking_uri(tracking_uri)
    client, exp = store.open_experiment(experiment, uri)
    # build_rows leaves out the compare runs that earlier versions logged into `experiment`
    rows = compare_table.build_rows(store.all_runs(client, exp.experiment_id))
    if not rows:
        raise PipelineError(f"MLflow experiment {experiment!r} in {uri} has no runs to compare")
    curves = {
        r["run"]: [(m.step, m.value) for m in client.get_metric_history(r["run_id"], VAL_METRIC)]
        for r in rows
    }
    files = write_comparison(rows, curves, output_dir)
    if log:
        try:
            run_id = _compare_run_id(client, experiment, uri)
            for path in files.values():
                client.log_artifact(run_id, str(path), artifact_path="compare")
        except Exception as exc:  # the files are written; MLflow only gets a copy
            print(f"warning: comparison not logged to MLflow at {uri} ({type(exc).__name__})")
    return files


def compare_folders(folders: list[Path], output_dir: Path) -> dict[str, Path]:
    """The same table and plots for run folders, from their tracking journals (no MLflow)."""
    from pipeline.runs.journal import read_run
    from pipeline.runs.tracking import FOLDER
    from pipeline.tools import compare_table

    rows, curves = [], {}
    for folder in folders:
        try:
            record = read_run(Path(folder) / FOLDER)
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"{folder}: not a run folder with a tracking journal ({exc})"
            ) from None
        rows.append(compare_table.row(record.name, record.params, record.metrics, str(folder)))
        curves[record.name] = record.history.get(VAL_METRIC, [])
    return write_comparison(compare_table.in_method_order(rows), curves, output_dir)


def run_command(args: argparse.Namespace) -> int:
    """CLI entry: write the comparison and print the Markdown table."""
    if args.runs:
        files = compare_folders(args.runs, args.output_dir)
    else:
        from pipeline.runs.store import absolute_uri, resolve_tracking_uri

        print(f"MLflow store: {absolute_uri(resolve_tracking_uri(args.tracking_uri))}", flush=True)
        files = compare(args.experiment, args.output_dir, args.tracking_uri, not args.no_mlflow)
    print(files["markdown"].read_text(), end="")
    print("\nwrote " + ", ".join(str(p) for p in files.values()))
    return 0
