"""`python -m pipeline visualize`: the paper's Figure 3 for your own pair of images.

Loads an AlignMixup/AE model, preprocesses the two images with its recipe's validation
transform, and decodes the interpolations λ ∈ {1, 0.75, 0.5, 0.25, 0} between their feature
tensors: unaligned, aligned by eq. 11 and aligned by eq. 12 (one row each, the input images at
both ends). Under the picture, and on stdout, the mean |aligned − unaligned| pixel difference per
λ says how much alignment changed each column, and the PSNR of the λ = 1 decoding against A
says how well the decoder reconstructs. The PNG is also logged to the checkpoint's MLflow run
when that store is reachable.

--fit-decoder-steps N first trains the decoder alone for N steps on the frozen encoder's
features of clean images (--fit-images, by default the recipe's data.root/train), as the
paper's decoder is trained, on clean images only; the classifier is untouched and the
checkpoint is not rewritten. Use it for short runs, whose decoder saw too few batches to draw
anything recognisable (the demo passes 60).
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
FOOTER_IN = 1.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


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
    p.add_argument(
        "--fit-decoder-steps",
        type=int,
        default=0,
        metavar="N",
        help="first fit the decoder alone for N steps on clean images (default 0: as trained)",
    )
    p.add_argument(
        "--fit-images",
        type=Path,
        metavar="DIR",
        help="folder of clean images to fit on (default: the recipe's data.root/train)",
    )
    p.add_argument(
        "--fit-max-images",
        type=int,
        default=2048,
        metavar="N",
        help="at most N of them, evenly spaced in name order (default 2048)",
    )
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


def clean_images(folder: Path, cfg: DataConfig, limit: int) -> Tensor:
    """Up to `limit` images under `folder` (any depth, evenly spaced in name order), as the
    model sees them at validation: (N, 3, H, W)."""
    import torch

    if not folder.is_dir():
        raise DataError(f"--fit-images: no folder {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--fit-images: no images under {folder} (pass a folder of images)")
    if limit < 1:
        raise DataError(f"--fit-max-images must be at least 1, got {limit}")
    if len(files) > limit:
        files = [files[i * len(files) // limit] for i in range(limit)]
    return torch.stack([load_image(p, cfg) for p in files])


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
    note: str = "",
) -> Path:
    """The labelled grid as a PNG: rows of decodings framed by A (left) and A′ (right), under
    each λ column the mean |aligned − unaligned| of eqs. 11 and 12 (`effect`, (2, λs)), and
    `note` as the last line."""
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
        fig.text(cw / 2, foot * 0.62, "mean |aligned −\nunaligned|", ha="center", va="center")
        for col, (eq11, eq12) in enumerate(effect.T.tolist()):
            text = f"eq. 11: {eq11:.3f}\neq. 12: {eq12:.3f}"
            fig.text((col + 2.5) * cw, foot * 0.62, text, ha="center", va="center", fontsize=9)
    if note:
        fig.text(0.5, foot * 0.18, note, ha="center", va="center", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def log_to_run(path: Path, run_id: str | None, tracking_uri: str | None) -> str:
    """Attach the PNG to the checkpoint's MLflow run if it can be found; says what happened."""
    from pipeline.runs.store import client_for, resolve_tracking_uri, store_exists

    uri = resolve_tracking_uri(tracking_uri)
    if not run_id or not store_exists(uri):
        return f"not logged to MLflow (no run id in the checkpoint or no store at {uri})"
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
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
    fit_steps: int = 0,
    fit_images: Path | None = None,
    fit_max_images: int = 2048,
) -> Path:
    """Load, (optionally) fit the decoder alone for `fit_steps` on clean images, decode and
    draw the grid; attach it to the checkpoint's MLflow run if `log`."""
    from pipeline.data.augment import unnormalize
    from pipeline.runs.model_file import load_model
    from pipeline.tools.interpolation import (
        LAMBDAS,
        alignment_effect,
        decoded_interpolations,
        effect_table,
        fit_decoder,
        psnr,
    )

    checkpoint = Path(checkpoint)
    model, recipe, extra = load_model(checkpoint)
    if not extra["has_decoder"]:
        raise CheckpointError(
            f"{checkpoint}: method {recipe.method.name!r} has no decoder; "
            "visualize needs an alignmixup_ae checkpoint"
        )
    cfg = recipe.data
    x_a, x_b = load_image(Path(image_a), cfg), load_image(Path(image_b), cfg)
    fitted = ""
    if fit_steps > 0:
        folder = Path(fit_images) if fit_images else Path(cfg.root) / "train"
        clean = clean_images(folder, cfg, fit_max_images)
        first, last = fit_decoder(model, clean, fit_steps, batch_size=16, progress=True)
        fitted = f"; decoder fitted alone for {fit_steps} steps on {len(clean):,} clean images"
        print(f"decoder fitted alone: L_r {first:.4f} → {last:.4f} in {fit_steps} steps")
    decoded = decoded_interpolations(model, x_a, x_b, recipe.method.solver())
    shown = [unnormalize(t, cfg.mean, cfg.std) for t in (decoded, x_a, x_b)]
    effect = alignment_effect(shown[0])  # in displayed pixels, [0, 1]
    quality = psnr(shown[0][1, LAMBDAS.index(1.0)], shown[1])  # eq. 11 at λ = 1
    note = f"λ = 1 decodes A: PSNR {quality:.1f} dB against A{fitted}"
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    names = (Path(image_a).name, Path(image_b).name)
    path = render_grid(*shown, names, output or folder / "interpolations.png", effect, note)
    print(effect_table(effect))
    print(note)
    if log:
        print(log_to_run(path, extra.get("mlflow_run_id"), recipe.tracking.tracking_uri))
    return path


def run_command(args: argparse.Namespace) -> int:
    """CLI entry: write the PNG and say where it went."""
    path = visualize(
        args.checkpoint,
        *args.images,
        args.output,
        not args.no_mlflow,
        args.fit_decoder_steps,
        args.fit_images,
        args.fit_max_images,
    )
    print(f"wrote {path}")
    return 0
