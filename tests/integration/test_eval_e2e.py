"""End to end on the CUB-format demo: fine-tune with the real trainer on CPU, `wsol`, `eval`.

The model is timm's 0.37M-parameter test ResNet at 64 px with the last stage at stride 16
(a 4×4 CAM, as the paper's ResNet-50 uses stride 1 in its last stage). 25 Adam steps are enough
for it to classify the digits and to localise them far better than the same network untrained.
"""

from __future__ import annotations

import argparse
import shutil

import mlflow
import pytest
import torch
from conftest import TINY_OVERRIDES

from pipeline.evaluation import cli
from pipeline.evaluation.cub_data import CubBoxDataset
from pipeline.evaluation.cub_synth import build_cub_demo
from pipeline.evaluation.run import evaluate_checkpoint, localize_model
from pipeline.methods import build_method
from pipeline.recipe import load_recipe
from pipeline.runs.model_file import load_model
from pipeline.training import train

pytestmark = pytest.mark.slow

_REPLACED = ("model.output_stride", "data.train_size", "data.val_resize", "data.val_crop")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_uri):
    """(CUB root, run folder, training summary) of a 25-step fine-tuning on the demo data."""
    root = tmp_path_factory.mktemp("cub")
    cub = build_cub_demo(root / "cub", n_train=30, n_test=10, size=64, num_classes=5, seed=0)
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(_REPLACED)] + [
        "name=cub_wsol",
        "model.output_stride=16",
        "data.layout=cub",
        f"data.root={cub}",
        "data.batch_size=32",
        "data.train_size=64",
        "data.val_resize=64",
        "data.val_crop=64",
        "data.crop_area=[0.5,1.0]",
        "optim.name=timm",
        "optim.timm_opt=adam",
        "optim.lr=0.003",
        "optim.weight_decay=0",
        "optim.scale_lr=false",
        "train.max_steps=25",
        "train.epochs=10",
        "train.eval_every=100",
        f"train.output_dir={root / 'run'}",
        f"tracking.tracking_uri={mlflow_uri}",
    ]
    summary = train(load_recipe(None, overrides))
    return cub, root / "run", summary


def _command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_wsol_trained_model_localises_better_than_random_weights(trained, tmp_path, capsys):
    cub, run, summary = trained
    assert _command(["wsol", "--checkpoint", str(run), "--data", str(cub), "--overlays", "3"]) == 0
    assert "maxboxacc_v2" in capsys.readouterr().out
    logged = mlflow.get_run(summary.mlflow_run_id)
    trained_v2 = logged.data.metrics["wsol/maxboxacc_v2"]
    artifacts = mlflow.MlflowClient().list_artifacts(summary.mlflow_run_id, "wsol_overlays")
    assert len(artifacts) == 3 and all(a.path.endswith(".png") for a in artifacts)

    _, recipe, extra = load_model(run)
    torch.manual_seed(0)
    untrained = build_method(recipe.method).build_model(recipe.model, extra["num_classes"])
    dataset = CubBoxDataset(cub, "test", 64, recipe.data.mean, recipe.data.std)
    # workers=2: images decoded by DataLoader workers, boxes scored in a process pool.
    random_scores, _ = localize_model(untrained, dataset, batch_size=25, workers=2)
    assert logged.data.metrics["wsol/top1_cls"] > 60  # it learned the classes
    assert trained_v2 > random_scores["maxboxacc_v2"] + 10


def test_eval_logs_every_metric_into_the_training_run(trained, digits_root, tmp_path, capsys):
    _, run, summary = trained
    ood = tmp_path / "digits"  # 40 handwritten digits as OOD images, two folders deep
    for path in sorted((digits_root / "val").rglob("*.JPEG"))[:40]:
        target = ood / path.parent.name / "more" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    argv = ["eval", "--checkpoint", str(run), "--ood-data", str(ood)]
    assert _command([*argv, "data.max_val_samples=20"]) == 0
    out = capsys.readouterr().out
    assert "pgd_err" in out and f"logged to mlflow run {summary.mlflow_run_id}" in out
    metrics = mlflow.get_run(summary.mlflow_run_id).data.metrics
    expected = {"top1_err", "top5_err", "ece", "fgsm_err", "pgd_err"}
    expected |= {
        f"ood/digits/{k}" for k in ("det_acc", "det_acc_best", "auroc", "aupr_in", "aupr_out")
    }
    assert {f"eval/{k}" for k in expected} <= set(metrics)
    # Attacks raise the loss of the true class: the error under attack is no lower.
    assert metrics["eval/fgsm_err"] >= metrics["eval/top1_err"]
    assert metrics["eval/pgd_err"] >= metrics["eval/top1_err"]


def test_eval_top1_matches_the_trainers_validation(trained):
    _, run, summary = trained
    results, _ = evaluate_checkpoint(run, ("classify",), log_mlflow=False)
    assert results["top1_err"] == pytest.approx(summary.top1_err, abs=1e-4)
