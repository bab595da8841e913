"""`sync-tracking`: send run folders' tracking journals to MLflow (what an outage left behind)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sync-tracking` command."""
    p = subparsers.add_parser(
        "sync-tracking",
        help="send what run folders' tracking journals hold and MLflow does not yet",
        description="Deliver each run folder's tracking journal (<run>/tracking/journal.jsonl) "
        "to the store the run recorded, into the MLflow run it was delivered to before (or a new "
        "one), from where the last delivery stopped. Exit 2 if MLflow does not answer.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.output_dir of a run")
    p.add_argument(
        "--tracking-uri",
        help="default: the URI the run recorded (where it was delivered, else the one it was "
        "tracked at); for runs that recorded none, $MLFLOW_TRACKING_URI or sqlite:///mlflow.db",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.runs.tracking import recorded_run_id, sync

    for folder in args.runs:
        sent, uri = sync(folder, args.tracking_uri)
        run_id = recorded_run_id(folder)
        print(f"{folder}: {sent} journal entries sent; MLflow run {run_id} at {uri}")
    return 0
