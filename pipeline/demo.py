"""`python -m pipeline demo`: the embedded default, end to end on the CPU.

Builds scikit-learn's handwritten digits as a folder of real JPEGs, trains `baseline`,
`alignmixup` and `alignmixup_ae` from `recipes/demo/` (DALI, CPU-only), logs them to MLflow,
prints their comparison and draws the AE's decoded interpolations.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pipeline.cli import add_recipe_options

RECIPES = ("baseline", "alignmixup", "alignmixup_ae")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "demo"
# Seconds per training step of each demo recipe, validation and checkpoints included, and the
# fixed cost of a demo (imports, the dataset, the picture), measured with `make demo` on this
# project's 2-core CPU machine (2026-12-02); only for the estimate printed at the start.
SECONDS_PER_STEP = {"demo_baseline": 0.14, "demo_alignmixup": 0.14, "demo_alignmixup_ae": 0.17}
FIXED_S = 23.0  # imports, the dataset, the decoder fit and the picture
# Decoder steps `visualize` fits before drawing (its --fit-decoder-steps): 6 epochs give the
# decoder ~28 clean batches, too few to reconstruct a digit; 60 more on the frozen encoder
# reached 22 dB PSNR on the demo pair in ~6 s here (measured 2026-12-03).
FIT_DECODER_STEPS = 60


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the three demo recipes on the digits and compare them")
    p.add_argument("--data", default="demo_data/digits", help="where to build the digits JPEGs")
    p.add_argument("--output", default="runs/demo", help="run folders go under here")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated demo recipes")
    add_recipe_options(p, "recipe overrides, applied to every demo recipe")
    p.set_defaults(func=run)


def demo_recipes(args: argparse.Namespace) -> list:
    """The demo's recipes with its data and output folders and the user's overrides."""
    from pipeline.recipe import load_recipe

    return [
        load_recipe(
            RECIPE_DIR / f"{name}.yaml",
            [
                f"data.root={args.data}",
                f"train.output_dir={Path(args.output) / name}",
                *args.overrides,
            ],
        )
        for name in args.recipes.split(",")
    ]


def estimate_s(recipes: list, train_images: int) -> list[float]:
    """Seconds each recipe should take here, from the measured per-step times."""
    out = []
    for r in recipes:
        steps = r.train.epochs * math.ceil(train_images / r.data.batch_size)
        steps = min(steps, r.train.max_steps or steps)
        out.append(steps * SECONDS_PER_STEP.get(r.name, max(SECONDS_PER_STEP.values())))
    return out


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from pipeline.recipe import print_config

    recipes = demo_recipes(args)
    if args.print_config:
        return print_config(recipes)
    from pipeline.data.demo import build_digits_dataset
    from pipeline.training import Trainer, summary_table

    root = build_digits_dataset(args.data)
    train_images = sum(1 for p in (root / "train").rglob("*") if p.is_file())
    expected = estimate_s(recipes, train_images)
    print(
        f"demo data: {root} ({train_images} training images). {len(recipes)} runs; about "
        f"{FIXED_S + sum(expected):.0f} s on a 2-core CPU like the one this was measured on"
    )
    summaries = []
    for i, recipe in enumerate(recipes):
        print(f"\n== {recipe.name} ({recipe.method.name}), run {i + 1} of {len(recipes)} ==")
        summaries.append(Trainer(recipe).fit())
        left = expected[i + 1 :]
        if left:  # rescale the rest by how this machine did so far
            pace = sum(s.wall_s for s in summaries) / max(sum(expected[: i + 1]), 1e-9)
            print(f"about {pace * sum(left):.0f} s to go")
    print("\n" + summary_table(summaries))
    ae = next((s for s in summaries if s.method == "alignmixup_ae"), None)
    if ae is not None:
        _interpolation_figure(Path(ae.output_dir), root)
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s. Browse the runs with "
        "`make mlflow-ui`; compare them with `make compare ARGS='--experiment demo'`."
    )
    return 0


def _interpolation_figure(run_dir: Path, data_root: Path) -> None:
    """The paper's Figure 3 for two validation digits of different classes, from the AE run."""
    from pipeline.runs.model_file import FINAL_MODEL
    from pipeline.tools.visualize import visualize

    val = sorted(p for p in (data_root / "val").iterdir() if p.is_dir())
    first, second = (next(iter(sorted(d.iterdir()))) for d in (val[0], val[-1]))
    out = visualize(
        run_dir / FINAL_MODEL,
        first,
        second,
        run_dir / "interpolations.png",
        fit_steps=FIT_DECODER_STEPS,
        fit_images=data_root / "train",
    )
    print(f"decoded interpolations: {out}")
