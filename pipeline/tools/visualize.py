"""`python -m pipeline visualize`: the paper's Figure 3 for your own pair of images.

Loads an AlignMixup/AE model, preprocesses the two images with its recipe's validation
transform, and decodes the interpolations λ ∈ {1, 0.75, 0.5, 0.25, 0} between their feature
tensors: unaligned, aligned by eq. 11 and aligned by eq. 12 (one row each, the input images at
both ends). Under the picture, and on stdout, the mean |aligned − unaligned| pixel difference per
λ says how much alignment changed each column. The PNG is also logged to the checkpoint's MLflow
run when that store is reachable.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.config import DataConfig

# Grid geometry in inches at DPI (whole inches × DPI, so the PNG size is exact):
# one label column and len(LAMBDAS) + 2 image columns, a header band and one row per ROWS entry.
DPI = 80
CELL_IN = 2.5
HEADER_IN = 1.25
FOOTER_IN = 0.75


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `visualize` command."""
    p = subparsers.add_parser(
        "visualize",
        help="decoded unaligned/aligned interpolations of two images (AlignMixup/AE checkpoint)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="model_final.safetensors or run folder"
    )
    p.add_argument("--images", required=True, nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--output", type=Path, help="PNG path (default: interpolations.png beside it)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the PNG to the run")
    p.set_defaults(func=run_command)


def load_image(path: Path, cfg: DataConfig) -> Tensor:
    """A file as the model sees it at validation: resize, centre crop, normalise (3, H, W)."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.data.augment import normalize, val_pil

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return normalize(val_pil(rgb, cfg), cfg.mean, cfg.std)


def grid_size_px(n_lambdas: int, n_rows: int) -> tuple[int, int]:
    """(width, height) of the PNG: label column + inputs + λ columns, header + rows + footer."""
    width_in = CELL_IN * (n_lambdas + 3)
    height_in = HEADER_IN + CELL_IN * n_rows + FOOTER_IN
    return round(width_in * DPI), round(height_in * DPI)


def _show(ax, image: Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def render_grid(
    decoded: Tensor,
    image_a: Tensor,
    image_b: Tensor,
    names: tuple[str, str],
    path: Path,
    effect: Tensor | None = None,
) -> Path:
    """The labelled grid as a PNG: rows of decodings framed by A (left) and A′ (right), and
    under each λ column the mean |aligned − unaligned| of eqs. 11 and 12 (`effect`, (2, λs))."""
    from matplotlib.figure import Figure

    from pipeline.tools.interpolation import LAMBDAS, ROWS

    n_rows, n_lams = decoded.shape[:2]
    width, height = grid_size_px(n_lams, n_rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # Figure fractions: a column, a row and the header band.
    cw, ch, head = 1 / (n_lams + 3), CELL_IN * DPI / height, HEADER_IN * DPI / height
    foot = FOOTER_IN * DPI / height
    pad = 0.04
    fig.text(0.5, 1 - 0.3 * head, "AlignMixup/AE: decoded interpolations", ha="center", fontsize=13)
    titles = [f"A: {names[0]}", *(f"λ = {lam:g}" for lam in LAMBDAS), f"A′: {names[1]}"]
    for col, title in enumerate(titles):
        fig.text((col + 1.5) * cw, 1 - 0.75 * head, title, ha="center", fontsize=9)
    for row, (label, formula) in enumerate(ROWS):
        bottom = 1 - head - (row + 1) * ch
        fig.text(cw / 2, bottom + ch / 2, f"{label}\n{formula}", ha="center", va="center")
        for col, image in enumerate([image_a, *decoded[row], image_b]):
            box = [(col + 1 + pad) * cw, bottom + pad * ch, (1 - 2 * pad) * cw, (1 - 2 * pad) * ch]
            _show(fig.add_axes(box), image)
    if effect is not None:
        fig.text(cw / 2, foot / 2, "mean |aligned −\nunaligned|", ha="center", va="center")
        for col, (eq11, eq12) in enumerate(effect.T.tolist()):
            text = f"eq. 11: {eq11:.3f}\neq. 12: {eq12:.3f}"
            fig.text((col + 2.5) * cw, foot / 2, text, ha="center", va="center", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def log_to_run(path: Path, run_id: str | None, tracking_uri: str | None) -> str:
    """Attach the PNG to the checkpoint's MLflow run if it can be found; says what happened."""
    from pipeline.runs.store import open_client, store_exists
    from pipeline.runs.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not run_id or not store_exists(uri):
        return f"not logged to MLflow (no run id in the checkpoint or no store at {uri})"
    from mlflow.exceptions import MlflowException

    client = open_client(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return f"not logged to MLflow (run {run_id} is not in {uri})"
    try:
        client.log_artifact(run_id, str(path), artifact_path="visualize")
    except Exception as exc:  # the PNG is written; MLflow only gets a copy
        return f"not logged to MLflow at {uri} ({type(exc).__name__})"
    return f"logged to MLflow run {run_id} ({uri}) under visualize/"


def visualize(
    checkpoint: Path,
    image_a: Path,
    image_b: Path,
    output: Path | None = None,
    log: bool = True,
) -> Path:
    """Load, decode and draw the grid; attach it to the checkpoint's MLflow run if `log`."""
    from pipeline.data.augment import unnormalize
    from pipeline.runs.model_file import load_model
    from pipeline.tools.interpolation import alignment_effect, decoded_interpolations, effect_table

    checkpoint = Path(checkpoint)
    model, recipe, extra = load_model(checkpoint)
    if not extra["has_decoder"]:
        raise CheckpointError(
            f"{checkpoint}: method {recipe.method.name!r} has no decoder; "
            "visualize needs an alignmixup_ae checkpoint"
        )
    cfg = recipe.data
    x_a, x_b = load_image(Path(image_a), cfg), load_image(Path(image_b), cfg)
    decoded = decoded_interpolations(model, x_a, x_b, recipe.method.solver())
    shown = [unnormalize(t, cfg.mean, cfg.std) for t in (decoded, x_a, x_b)]
    effect = alignment_effect(shown[0])  # in displayed pixels, [0, 1]
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    names = (Path(image_a).name, Path(image_b).name)
    path = render_grid(*shown, names, output or folder / "interpolations.png", effect)
    print(effect_table(effect))
    if log:
        print(log_to_run(path, extra.get("mlflow_run_id"), recipe.tracking.tracking_uri))
    return path


def run_command(args: argparse.Namespace) -> int:
    """CLI entry: write the PNG and say where it went."""
    path = visualize(args.checkpoint, *args.images, args.output, not args.no_mlflow)
    print(f"wrote {path}")
    return 0
