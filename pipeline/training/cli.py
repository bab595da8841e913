"""`python -m pipeline train --recipe recipes/X.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from pipeline.cli import add_recipe_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one recipe (resumes automatically)")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/demo/baseline.yaml")
    add_recipe_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe, print_config
    from pipeline.training import Trainer, summary_table
    from pipeline.training.preempt import EXIT_PREEMPTED

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        return print_config([recipe])
    trainer = Trainer(recipe)
    summary = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(summary_table([summary]))
        print(f"output: {summary.output_dir}   mlflow run: {summary.mlflow_run_id}")
    return EXIT_PREEMPTED if summary.preempted else 0
