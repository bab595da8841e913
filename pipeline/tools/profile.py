"""`python -m pipeline profile`: msec per training step of every method (the paper's Table 2).

Defaults fit the machine: on a GPU ResNet-50 at 224 px, batch 128, AMP bf16, channels-last; on a
CPU ResNet-50 at 64 px, batch 8, float32, 20 steps, then 20 more under torch's profiler for the
methods' own sections (a minute or two on 2 idle cores). The table is printed, optionally
written as JSON (`--output`), and logged as an MLflow run in the experiment `profile` (metrics
`<method>/msec_per_batch`, ... and the table as artifacts).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.cli import add_recipe_options

# Per device type: size, batch, amp, steps, warmup, channels_last.
DEFAULTS = {
    "cuda": {
        "size": 224,
        "batch": 128,
        "amp": "bf16",
        "steps": 50,
        "warmup": 10,
        "channels_last": True,
    },
    "cpu": {"size": 64, "batch": 8, "amp": "no", "steps": 20, "warmup": 2, "channels_last": False},
}
METRICS = (
    "msec_per_batch",
    "msec_iqr",
    "images_per_s",
    "ratio_to_baseline",
    "hook_msec",
    "epoch_s",
)


def _defaults(key: str) -> str:
    return f" (GPU {DEFAULTS['cuda'][key]}, CPU {DEFAULTS['cpu'][key]})"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `profile` command."""
    p = subparsers.add_parser(
        "profile",
        help="msec/batch of a training step for every method (interleaved, median)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="resnet50", help="timm model name (default: %(default)s)")
    p.add_argument("--size", type=int, help="image side in px" + _defaults("size"))
    p.add_argument("--batch", type=int, help="batch size" + _defaults("batch"))
    p.add_argument("--amp", choices=("no", "bf16", "fp16"), help="autocast" + _defaults("amp"))
    p.add_argument("--steps", type=int, help="timed steps per method" + _defaults("steps"))
    p.add_argument(
        "--warmup", type=int, help="untimed steps per method first" + _defaults("warmup")
    )
    p.add_argument("--methods", help="comma-separated (default: every registered method)")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format" + _defaults("channels_last"),
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's parts (as model.compile: true in training)",
    )
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--num-classes", type=int, default=1000, help="default: %(default)s")
    add_recipe_options(
        p,
        "recipe overrides, e.g. method.sinkhorn=converged; a method.KEY override applies to the "
        "methods that have KEY",
    )
    p.add_argument(
        "--epoch-images",
        type=int,
        metavar="N",
        help="also give the seconds an epoch of N training images takes at this speed, e.g. "
        "50000 for CIFAR (steps of --batch × the measured msec/batch)",
    )
    p.add_argument("--output", type=Path, help="write the records as JSON here")
    p.add_argument("--no-mlflow", action="store_true", help="log no MLflow run")
    p.add_argument(
        "--experiment", default="profile", help="MLflow experiment (default: %(default)s)"
    )
    p.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    p.set_defaults(func=run_command)


def settings_from_args(args: argparse.Namespace):
    """Command-line options over the defaults of the device in use."""
    import torch

    from pipeline.errors import PipelineError
    from pipeline.methods import method_names
    from pipeline.tools.benchmark import Settings, check_settings
    from pipeline.tools.method_order import ordered_methods

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in DEFAULTS:
        raise PipelineError(f"--device {device!r}: expected cuda, cuda:N or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device!r}: no CUDA device is available")
    chosen = {
        k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[kind].items()
    }
    chosen["threads"] = torch.get_num_threads() if args.threads is None else args.threads
    for key in ("size", "batch", "steps", "threads"):
        if chosen[key] < 1:
            raise PipelineError(f"--{key} must be at least 1, got {chosen[key]}")
    if chosen["warmup"] < 0:
        raise PipelineError(f"--warmup must be at least 0, got {chosen['warmup']}")
    methods = (
        [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.methods
        else ordered_methods(method_names())
    )
    settings = Settings(
        methods=methods,
        model=args.model,
        compile=args.compile,
        device=device,
        num_classes=args.num_classes,
        overrides=list(args.overrides),
        **chosen,
    )
    check_settings(settings)  # a bad method or override fails here, named, before any work
    return settings


def _sections(record: dict) -> str:
    """The method's sections as `name ms/step`, e.g. `align 3.1, mix 0.2`."""
    parts = record["hook_sections_msec_per_step"].items()
    return ", ".join(f"{name} {ms:.2f}" for name, ms in parts) or "–"


def format_table(records: list[dict]) -> str:
    """The records as a Markdown table; times in ms, the hook's per step, the split per call."""
    from pipeline.tables import cell, format_table

    headers = [
        "method",
        "params",
        "msec/batch",
        "IQR",
        "images/s",
        "× baseline",
        "hook ms/step",
        "hook sections ms/step",
        "align_mix ms/call",
        "Sinkhorn ms/call (iters)",
    ]
    epoch = records and "epoch_s" in records[0]
    if epoch:
        headers.append(f"s/epoch ({records[0]['epoch_images']} images)")
    rows = []
    for r in records:
        sinkhorn = cell(r.get("sinkhorn_msec_per_call"), ".2f")
        if "sinkhorn_iterations" in r:
            sinkhorn += f" ({r['sinkhorn_iterations']})"
        cells = [
            r["method"],
            f"{r['params'] / 1e6:.2f}M",
            cell(r["msec_per_batch"], ".1f"),
            cell(r["msec_iqr"], ".1f"),
            cell(r["images_per_s"], ".1f"),
            cell(r["ratio_to_baseline"], ".3f"),
            cell(r["hook_msec"], ".2f"),
            _sections(r),
            cell(r.get("align_mix_msec_per_call"), ".2f"),
            sinkhorn,
        ]
        if epoch:
            cells.append(cell(r["epoch_s"], ".1f"))
        rows.append(cells)
    return format_table(headers, rows)


def format_table2(records: list[dict]) -> str:
    """The paper's Table 2 beside this run: each method's cost as a ratio to the baseline,
    here and on the authors' RTX 2080 Ti (absolute times of different machines do not compare;
    ratios measured in one run do)."""
    from pipeline.tables import cell, format_table
    from pipeline.tools.reference import TABLE2

    base = TABLE2["baseline"][1]
    headers = [
        "method",
        "params",
        "paper params",
        "msec/batch",
        "paper msec/batch",
        "× baseline",
        "paper × baseline",
        "paper top-1 err (%)",
    ]
    rows = []
    for r in records:
        paper = TABLE2.get(r["method"])
        rows.append(
            [
                r["method"],
                f"{r['params'] / 1e6:.2f}M",
                f"{paper[0]}M" if paper else "–",
                cell(r["msec_per_batch"], ".1f"),
                str(paper[1]) if paper else "–",
                cell(r["ratio_to_baseline"], ".3f"),
                f"{paper[1] / base:.3f}" if paper else "–",
                f"{paper[2]:.2f}" if paper else "–",
            ]
        )
    return format_table(headers, rows)


def describe(settings) -> str:
    """One line naming what was measured."""
    return (
        f"{settings.model}, {settings.size} px, batch {settings.batch}, amp {settings.amp}, "
        f"channels_last {settings.channels_last}, compile {settings.compile}, {settings.device} "
        f"({settings.threads} threads), {settings.steps} timed steps after "
        f"{settings.warmup} warm-up"
    )


def log_to_mlflow(records: list[dict], table: str, settings, experiment: str, uri: str) -> str:
    """One run in `experiment`: settings as params, metrics per method, table and JSON as files,
    with the run's provenance (provenance.py)."""
    import tempfile
    from dataclasses import asdict

    from pipeline.runs.provenance import new_run
    from pipeline.runs.store import client_for, experiment_id
    from pipeline.runs.tracking import DESCRIPTION_TAG, UNITS_NOTE

    client = client_for(uri)
    exp_id = experiment_id(experiment, uri)
    name = f"profile-{settings.model}-{settings.device}-{settings.size}px"
    run_id = new_run(client, exp_id, name, {DESCRIPTION_TAG: UNITS_NOTE})
    for key, value in asdict(settings).items():
        client.log_param(run_id, key, ",".join(value) if isinstance(value, list) else value)
    for r in records:
        client.log_metric(run_id, f"{r['method']}/params", r["params"])
        for key in METRICS:
            if r.get(key) is not None:
                client.log_metric(run_id, f"{r['method']}/{key}", r[key])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "profile.md").write_text(describe(settings) + "\n\n" + table)
        (Path(tmp) / "profile.json").write_text(json.dumps(records, indent=2))
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id)
    return run_id


def run_command(args: argparse.Namespace) -> int:
    """CLI entry: measure, print the table, write JSON, log to MLflow."""
    from pipeline.runs.store import resolve_tracking_uri
    from pipeline.tools.benchmark import run_profile

    settings = settings_from_args(args)
    if args.epoch_images is not None and args.epoch_images < 1:
        from pipeline.errors import PipelineError

        raise PipelineError(f"--epoch-images must be at least 1, got {args.epoch_images}")
    if args.print_config:
        from pipeline.recipe import print_config
        from pipeline.tools.benchmark import recipe_for

        return print_config([recipe_for(method, settings) for method in settings.methods])
    records = run_profile(settings)
    if args.epoch_images:
        steps = math.ceil(args.epoch_images / settings.batch)
        for r in records:
            r["epoch_images"], r["epoch_s"] = args.epoch_images, r["msec_per_batch"] * steps / 1e3
    table = format_table(records)
    table += (
        "\nThe paper's Table 2 (ImageNet ResNet-50, one RTX 2080 Ti) beside this run:\n\n"
        + format_table2(records)
    )
    print(f"\n{describe(settings)}\n\n{table}", end="")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {args.output}")
    if not args.no_mlflow:
        uri = resolve_tracking_uri(args.tracking_uri)
        try:
            run_id = log_to_mlflow(records, table, settings, args.experiment, uri)
        except Exception as exc:  # the table is printed (and the JSON written): warn only
            print(f"warning: not logged to MLflow at {uri} ({type(exc).__name__}: {exc})")
        else:
            print(f"MLflow run {run_id} in experiment {args.experiment!r} ({uri})")
    return 0
