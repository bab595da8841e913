"""`python -m pipeline demo`: the embedded default, end to end on the CPU.

Builds scikit-learn's handwritten digits as a folder of real JPEGs, trains `baseline`,
`alignmixup` and `alignmixup_ae` from `recipes/demo/` (DALI, CPU-only), logs them to MLflow,
prints their comparison and draws the AE's decoded interpolations.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RECIPES = ("baseline", "alignmixup", "alignmixup_ae")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the three demo recipes on the digits and compare them")
    p.add_argument("--data", default="demo_data/digits", help="where to build the digits JPEGs")
    p.add_argument("--output", default="runs/demo", help="run folders go under here")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated demo recipes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every recipe")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.demo import build_digits_dataset
    from pipeline.recipe import load_recipe
    from pipeline.training import Trainer, summary_table

    started = time.perf_counter()
    root = build_digits_dataset(args.data)
    print(f"demo data: {root}")
    summaries = []
    for name in args.recipes.split(","):
        recipe = load_recipe(
            RECIPE_DIR / f"{name}.yaml",
            [f"data.root={root}", f"train.output_dir={Path(args.output) / name}", *args.overrides],
        )
        print(f"\n== {recipe.name} ({recipe.method.name}) ==")
        summaries.append(Trainer(recipe).fit())
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
    out = visualize(run_dir / FINAL_MODEL, first, second, run_dir / "interpolations.png")
    print(f"decoded interpolations: {out}")
