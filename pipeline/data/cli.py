"""`check-data` (validate a dataset up front) and `make-demo-data` (build the digits JPEGs)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `check-data` and `make-demo-data` commands."""
    check = subparsers.add_parser(
        "check-data",
        help="validate a dataset: classes, images per split, unreadable files",
        description="Decode every image of a dataset and list the bad ones (exit 2 if any); "
        "write each split's index, so the next training run starts without scanning.",
    )
    check.add_argument("path", help="dataset root (e.g. data/imagenet)")
    check.add_argument(
        "--layout", choices=["imagefolder", "filelist", "cub"], default="imagefolder"
    )
    check.add_argument("--train-list", help="filelist layout: 'path label' lines for train")
    check.add_argument("--val-list", help="filelist layout: 'path label' lines for val")
    check.add_argument("--workers", type=int, default=4, help="processes checking files")
    check.add_argument("--quick", action="store_true", help="headers only, as the loaders do")
    check.set_defaults(func=run_check)

    demo = subparsers.add_parser(
        "make-demo-data",
        help="write scikit-learn's handwritten digits as a folder of JPEGs",
        description="Build train/<digit>/*.JPEG and val/<digit>/*.JPEG from sklearn's digits.",
    )
    demo.add_argument("out_dir", help="folder to write (skipped if already built alike)")
    demo.add_argument("--size", type=int, default=32, help="image side in pixels")
    demo.add_argument("--val-fraction", type=float, default=0.2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_make_demo_data)


def run_check(args: argparse.Namespace) -> int:
    """Print the dataset summary; exit status 2 when any file or folder is bad."""
    from pipeline.config import DataConfig
    from pipeline.data.dataset_report import check_dataset, format_report

    cfg = DataConfig(
        root=args.path,
        layout=args.layout,
        train_list=args.train_list,
        val_list=args.val_list,
        num_threads=max(1, args.workers),
    )
    report = check_dataset(cfg, full=not args.quick)
    print(format_report(report))
    return 2 if report.problems else 0


def run_make_demo_data(args: argparse.Namespace) -> int:
    """Build the digits dataset and print where it is."""
    from pipeline.data.demo import build_digits_dataset

    root = build_digits_dataset(args.out_dir, args.size, args.val_fraction, args.seed)
    print(f"digits dataset ready in {root}")
    return 0
