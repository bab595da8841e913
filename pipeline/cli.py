"""`python -m pipeline <command>`: one entry point; each command lives in its own module.

A command module exposes `register(subparsers)`, which adds its parser and sets `func`;
modules keep heavy imports (torch, DALI, MLflow) inside their functions so `--help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import PipelineError

COMMAND_MODULES = (
    "pipeline.training.cli",  # train
    "pipeline.data.cli",  # check-data, make-demo-data
    "pipeline.evaluation.cli",  # eval, wsol
    "pipeline.tools.profile",  # profile
    "pipeline.tools.compare",  # compare
    "pipeline.tools.visualize",  # visualize
    "pipeline.runs.cli",  # sync-tracking
    "pipeline.demo",  # demo
)


def add_recipe_options(parser: argparse.ArgumentParser, what: str = "recipe overrides") -> None:
    """The two options every command that runs a recipe shares: `key=value` overrides
    (positional, as `train` takes them) and `--print-config`."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=what)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe as YAML (defaults, extends: and overrides merged; one "
        "document per recipe) and exit without running anything",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="AlignMixup training pipeline: train, evaluate, profile and compare runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PipelineError as exc:
        # Errors about the user's input: one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
