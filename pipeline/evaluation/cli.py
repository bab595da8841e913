"""`eval`, `wsol` and `make-cub-demo`: evaluate a trained checkpoint (docs/evaluation.md)."""

from __future__ import annotations

import argparse

from pipeline.cli import add_recipe_options

DEFAULT_SUITE = "classify,calibration,fgsm,pgd"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval`, `wsol` and `make-cub-demo` commands."""
    ev = subparsers.add_parser(
        "eval",
        help="top-1/5 error, ECE, FGSM/PGD error and OOD detection of a checkpoint",
        description="Evaluate a checkpoint on its recipe's validation split; log to its MLflow "
        "run and print a table. All numbers are percentages.",
    )
    ev.add_argument(
        "--checkpoint", required=True, help="model_final.safetensors, run or checkpoint folder"
    )
    ev.add_argument(
        "--suite",
        default=None,
        help=f"comma-separated parts of {DEFAULT_SUITE},ood "
        f"(default: {DEFAULT_SUITE}, plus ood when --ood-data is given)",
    )
    ev.add_argument(
        "--ood-data",
        action="append",
        default=[],
        metavar="[NAME=]FOLDER",
        help="out-of-distribution images (any layout under FOLDER), reported as NAME (default: "
        "the folder's name); repeat the flag for several sets",
    )
    ev.add_argument("--data", help="dataset root (overrides the recipe's data.root)")
    ev.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    ev.add_argument(
        "--weights", choices=("raw", "ema"), default="raw", help="the EMA (train.ema_decay)"
    )
    add_recipe_options(ev, "overrides of the checkpoint's recipe")
    ev.set_defaults(func=run_eval)

    ws = subparsers.add_parser(
        "wsol",
        help="CAM localisation on CUB: Top-1 Loc, GT-known Loc, MaxBoxAcc-v2",
        description="Weakly-supervised localisation of a checkpoint on a CUB-format dataset "
        "(wsolevaluation's metadata layout); numbers are percentages.",
    )
    ws.add_argument(
        "--checkpoint", required=True, help="model_final.safetensors, run or checkpoint folder"
    )
    ws.add_argument("--data", required=True, help="CUB root (metadata/<split>/*.txt inside)")
    ws.add_argument("--split", default="test", help="metadata split to score (default test)")
    ws.add_argument("--cam-threshold", type=float, default=0.15, help="for Top-1 / GT-known Loc")
    ws.add_argument("--overlays", type=int, default=8, help="CAM-and-box PNGs to log")
    ws.add_argument("--overlay-dir", help="also keep the overlay PNGs in this folder")
    ws.add_argument("--no-mlflow", action="store_true", help="print only, log nothing")
    ws.add_argument(
        "--weights", choices=("raw", "ema"), default="raw", help="the EMA (train.ema_decay)"
    )
    add_recipe_options(ws, "overrides of the checkpoint's recipe")
    ws.set_defaults(func=run_wsol)

    demo = subparsers.add_parser(
        "make-cub-demo",
        help="write a small CUB-format dataset (digits on photos) with true boxes",
        description="Digits from scikit-learn pasted on crops of its sample photos, in "
        "wsolevaluation's metadata layout.",
    )
    demo.add_argument("out_dir", help="folder to write")
    demo.add_argument("--n-train", type=int, default=30, help="train images per class")
    demo.add_argument("--n-test", type=int, default=10, help="test images per class")
    demo.add_argument("--size", type=int, default=96, help="about the image side in pixels")
    demo.add_argument("--classes", type=int, default=5, help="number of digit classes (2-10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_make_cub_demo)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, log and print the results table."""
    from pipeline.evaluation.report import results_table
    from pipeline.evaluation.run import evaluate_checkpoint, parse_suite

    if args.print_config:
        from pipeline.evaluation.run import checkpoint_recipe
        from pipeline.recipe import print_config

        return print_config(
            [checkpoint_recipe(args.checkpoint, args.overrides, args.data, args.weights)]
        )
    suite_text = args.suite or DEFAULT_SUITE + (",ood" if args.ood_data else "")
    results, logged = evaluate_checkpoint(
        args.checkpoint,
        parse_suite(suite_text),
        args.ood_data,
        args.data,
        args.overrides,
        log_mlflow=not args.no_mlflow,
        weights=args.weights,
    )
    print(results_table(results, f"evaluation of {args.checkpoint} ({args.weights} weights)"))
    if logged:
        print(logged)
    return 0


def run_wsol(args: argparse.Namespace) -> int:
    """Localise, log and print the results table."""
    from pipeline.evaluation.report import results_table
    from pipeline.evaluation.run import checkpoint_recipe, localize_checkpoint
    from pipeline.recipe import print_config

    if args.print_config:
        return print_config(
            [checkpoint_recipe(args.checkpoint, args.overrides, None, args.weights)]
        )
    scores, logged = localize_checkpoint(
        args.checkpoint,
        args.data,
        cam_threshold=args.cam_threshold,
        overlays=args.overlays,
        overlay_dir=args.overlay_dir,
        split=args.split,
        overrides=args.overrides,
        log_mlflow=not args.no_mlflow,
        weights=args.weights,
    )
    print(results_table(scores, f"WSOL of {args.checkpoint} on {args.data} ({args.split})"))
    if logged:
        print(logged)
    return 0


def run_make_cub_demo(args: argparse.Namespace) -> int:
    """Write the dataset and say where."""
    from pipeline.evaluation.cub_synth import build_cub_demo

    root = build_cub_demo(
        args.out_dir, args.n_train, args.n_test, args.size, args.classes, args.seed
    )
    print(f"CUB-format demo dataset ready in {root}")
    return 0
