"""The `eval` and `wsol` suites: run a trained model over the data and collect the metrics.

`evaluate_model` / `localize_model` work on any model and iterable of batches (the tests call
them directly); `evaluate_checkpoint` / `localize_checkpoint` load a checkpoint with its recipe,
build the data the recipe names, and log the results to MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline.data.augment import unnormalize
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.attacks import fgsm, pgd, pixel_model
from pipeline.evaluation.metrics import (
    expected_calibration_error,
    max_softmax,
    ood_metrics,
    topk_errors,
)
from pipeline.recipe import Recipe, apply_overrides

__all__ = [
    "ATTACKS",
    "SUITES",
    "evaluate_checkpoint",
    "evaluate_model",
    "localize_checkpoint",
    "localize_model",
    "parse_suite",
]

SUITES = ("classify", "calibration", "fgsm", "pgd", "ood")
# docs/evaluation.md (PuzzleMix's protocol): ε, step and iterations on [0, 1] pixels.
ATTACKS = {
    "fgsm": {"eps": 8 / 255},
    "pgd": {"eps": 4 / 255, "step": 2 / 255, "iterations": 20, "random_start": True},
}


def parse_suite(text: str) -> tuple[str, ...]:
    """'classify,pgd' → ('classify', 'pgd'); an unknown name is an error naming it."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in SUITES]
    if unknown or not parts:
        raise PipelineError(f"--suite {text!r}: unknown part(s) {unknown}; choose from {SUITES}")
    return parts


def _device(recipe: Recipe) -> torch.device:
    """The GPU when there is one and the recipe allows it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not recipe.train.cpu else "cpu")


def _workers(recipe: Recipe) -> int:
    """DataLoader workers for evaluation data: the recipe's threads; 1 means the main process."""
    return recipe.data.num_threads if recipe.data.num_threads > 1 else 0


def _attack_errors(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
) -> dict[str, int]:
    """Number of valid samples of one batch misclassified after each attack."""
    pixels = unnormalize(images.float(), mean, std)
    net = pixel_model(model, mean, std)
    valid = labels >= 0
    wrong = {}
    for name in attacks:
        if name == "fgsm":
            adversarial = fgsm(net, pixels, labels, **ATTACKS["fgsm"])
        else:
            adversarial = pgd(net, pixels, labels, generator=generator, **ATTACKS["pgd"])
        with torch.no_grad():
            predicted = net(adversarial).argmax(dim=1)
        wrong[name] = int(((predicted != labels) & valid).sum())
    return wrong


def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    suite: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    ood_batches: dict[str, Iterable[torch.Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The suite's metrics (%) over labelled batches of normalised images (label −1 = padding)."""
    model.eval()
    attacks = [a for a in ("fgsm", "pgd") if a in suite]
    logits, labels, wrong = [], [], dict.fromkeys(attacks, 0)
    generator: torch.Generator | None = None
    for images, target in batches:
        with torch.no_grad():
            logits.append(model(images).float().cpu())
        labels.append(target.cpu())
        if attacks:
            if generator is None:
                generator = torch.Generator(device=images.device).manual_seed(seed)
            for name, count in _attack_errors(
                model, images, target, attacks, mean, std, generator
            ).items():
                wrong[name] += count
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    n_valid = int((all_labels >= 0).sum())
    if n_valid == 0:
        raise DataError("evaluation data: no labelled samples")
    results: dict[str, float] = {}
    if "classify" in suite:
        errors = topk_errors(all_logits, all_labels, (1, 5))
        results["top1_err"], results["top5_err"] = errors[1], errors[5]
    if "calibration" in suite:
        results["ece"] = expected_calibration_error(all_logits, all_labels, n_bins=15)
    for name in attacks:
        results[f"{name}_err"] = 100.0 * wrong[name] / n_valid
    if "ood" in suite:
        scores_id = max_softmax(all_logits[all_labels >= 0])
        for name, ood in (ood_batches or {}).items():
            with torch.no_grad():
                scores_ood = torch.cat([max_softmax(model(x).cpu()) for x in ood])
            for key, value in ood_metrics(scores_id, scores_ood).items():
                results[f"ood/{name}/{key}"] = value
    return results


def _on_device(loader: Iterable[torch.Tensor], device: torch.device) -> Iterable[torch.Tensor]:
    for x in loader:
        yield x.to(device, non_blocking=True)


def _resolve(
    recipe: Recipe, checkpoint: str | Path, overrides: Sequence[str], data_root: str | None
) -> Recipe:
    """The checkpoint's recipe with the command's overrides and `--data` applied."""
    recipe = apply_overrides(recipe, tuple(overrides), f"{checkpoint} recipe")
    if data_root is not None:
        recipe.data.root = str(data_root)
    return recipe


def checkpoint_recipe(
    checkpoint: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | None = None,
    weights: str = "raw",
) -> Recipe:
    """The recipe `eval`/`wsol` would run a checkpoint with (`--print-config`)."""
    from pipeline.runs.model_file import read_weights

    return _resolve(read_weights(checkpoint, weights)[1], checkpoint, overrides, data_root)


def evaluate_checkpoint(
    checkpoint: str | Path,
    suite: Sequence[str],
    ood_folders: Sequence[str | Path] = (),  # each "[NAME=]FOLDER"
    data_root: str | None = None,
    overrides: Sequence[str] = (),
    log_mlflow: bool = True,
    weights: str = "raw",
) -> tuple[dict[str, float], str | None]:
    """Load (the raw or the EMA `weights`), evaluate on the recipe's val split (and OOD
    folders), log; → (results, where they were logged, one line; None without logging)."""
    from pipeline.data import build_loaders
    from pipeline.evaluation.ood_data import OodFolder, find_images, ood_sets
    from pipeline.evaluation.report import log_results
    from pipeline.runs.model_file import load_model

    if "ood" in suite and not ood_folders:
        raise PipelineError("--suite ood: give at least one --ood-data folder")
    # Scan the OOD folders first, so an empty one fails before the model is loaded.
    ood_files = {name: find_images(f) for name, f in ood_sets(list(ood_folders)).items()}
    model, recipe, extra = load_model(checkpoint, weights)
    recipe = _resolve(recipe, checkpoint, overrides, data_root)
    device = _device(recipe)
    loaders = build_loaders(
        recipe.data, 0, 1, device, recipe.train.seed, class_names=extra["class_names"]
    )
    batch = recipe.data.val_batch_size or recipe.data.batch_size
    ood_batches = {
        name: _on_device(
            torch.utils.data.DataLoader(
                OodFolder(files, recipe.data), batch_size=batch, num_workers=_workers(recipe)
            ),
            device,
        )
        for name, files in ood_files.items()
    }
    results = evaluate_model(
        model.to(device),
        loaders.val,
        suite,
        recipe.data.mean,
        recipe.data.std,
        ood_batches,
        seed=recipe.train.seed,
    )
    logged = None
    if log_mlflow:
        section = "eval" if weights == "raw" else "eval_ema"  # the EMA's beside the raw
        metrics = {f"{section}/{k}": v for k, v in results.items()}
        logged = log_results(recipe, extra, checkpoint, metrics)
    return results, logged


def localize_model(
    model: nn.Module,
    dataset,
    batch_size: int = 32,
    cam_threshold: float = 0.15,
    overlays: int = 0,
    overlay_dir: Path | None = None,
    workers: int = 0,
) -> tuple[dict[str, float], list[Path]]:
    """WSOL scores (%) of a model over a `CubBoxDataset`, and the overlay PNGs it wrote.

    With `workers` > 1, images are decoded by that many DataLoader workers and their boxes
    scored (100 thresholds × connected components, CPU-bound) by that many processes.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from contextlib import ExitStack

    from pipeline.evaluation.boxes import boxes_from_scoremap
    from pipeline.evaluation.overlays import save_overlay
    from pipeline.evaluation.wsol import LocalizationAccumulator, class_activation_maps, image_ious

    model.eval()
    device = next(model.parameters()).device
    accumulator = LocalizationAccumulator(fixed_threshold=cam_threshold)
    score = partial(
        image_ious, cam_thresholds=accumulator.cam_thresholds, fixed_threshold=cam_threshold
    )
    written: list[Path] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    with ExitStack() as stack:
        mapper = map
        if workers > 1:
            # Forked like DataLoader workers, and like them held to one torch thread; they only
            # run NumPy/SciPy and torchvision's box_iou on the CPU, never CUDA.
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
            mapper = stack.enter_context(pool).map
        for images, labels, indices in loader:
            logits, cams = class_activation_maps(model, images.to(device), labels.to(device))
            cams = cams.cpu().numpy()
            correct = (logits.argmax(dim=1).cpu() == labels).tolist()
            gt_boxes = [dataset.boxes(i) for i in indices.tolist()]
            for ious, ok in zip(mapper(score, cams, gt_boxes), correct, strict=True):
                accumulator.add_ious(*ious, ok)
            for cam, index, label, ok, boxes in zip(
                cams, indices.tolist(), labels.tolist(), correct, gt_boxes, strict=True
            ):
                if overlay_dir is None or len(written) >= overlays:
                    break
                name = Path(dataset.records[index].path).name
                written.append(
                    save_overlay(
                        overlay_dir / f"overlay_{index:05d}.png",
                        dataset.pixels(index),
                        cam,
                        boxes,
                        boxes_from_scoremap(cam, cam_threshold, all_contours=False),
                        f"{name}  class {label}" + ("" if ok else " (misclassified)"),
                    )
                )
    scores = accumulator.compute()
    for delta, threshold in accumulator.best_thresholds().items():
        if scores[f"maxboxacc_iou{delta}"] > 0:  # no best threshold when none is right
            scores[f"best_cam_threshold_iou{delta}"] = 100.0 * threshold
    return scores, written


def localize_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    cam_threshold: float = 0.15,
    overlays: int = 0,
    overlay_dir: str | Path | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    log_mlflow: bool = True,
    weights: str = "raw",
) -> tuple[dict[str, float], str | None]:
    """Load (the raw or the EMA `weights`), compute CAMs over a CUB split, score them, log with
    overlays; → (scores, where they were logged, one line; None without logging)."""
    from pipeline.evaluation.cub_data import CubBoxDataset
    from pipeline.evaluation.report import log_results
    from pipeline.runs.model_file import load_model

    model, recipe, extra = load_model(checkpoint, weights)
    recipe = _resolve(recipe, checkpoint, overrides, None)
    dataset = CubBoxDataset(
        data_root, split, recipe.data.val_crop, recipe.data.mean, recipe.data.std
    )
    model = model.to(_device(recipe))
    batch = recipe.data.val_batch_size or recipe.data.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(overlay_dir) if overlay_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        scores, written = localize_model(
            model, dataset, batch, cam_threshold, overlays, folder, _workers(recipe)
        )
        logged = None
        if log_mlflow:
            section = "wsol" if weights == "raw" else "wsol_ema"
            metrics = {f"{section}/{k}": v for k, v in scores.items()}
            logged = log_results(recipe, extra, checkpoint, metrics, written, "wsol_overlays")
    return scores, logged
