"""What a newcomer meets first: `make` prints help and installs nothing, every command that runs a
recipe shows it with `--print-config` (YAML that loads back to the same recipe), overrides are
`key=value` everywhere, and every error or accuracy a table or plot shows says it is in %."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo"


def _printed(capsys, argv: list[str]) -> list[Recipe]:
    """Run a command with --print-config; the recipes its output holds, one per document."""
    assert main(argv) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d is not None]
    return [Recipe.model_validate(d) for d in docs]


def test_make_without_a_target_lists_the_targets_and_installs_nothing(tmp_path):
    venv = tmp_path / "venv"
    out = subprocess.run(
        ["make", "-C", str(REPO), f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert not venv.exists()  # nothing installed
    listed = {line.split()[1] for line in out.splitlines() if line.startswith("  make ")}
    assert {"help", "setup", "test", "demo", "profile", "compare", "docker"} <= listed
    assert all(len(line.split(None, 2)) == 3 for line in out.splitlines())  # each has a line


def test_train_print_config_is_the_recipe_with_its_overrides(capsys, tmp_path):
    overrides = ["train.epochs=3", "method.clean_prob=0.5", "model.ae.decoder_width=64"]
    (printed,) = _printed(
        capsys,
        ["train", "--recipe", str(DEMO / "alignmixup_ae.yaml"), "--print-config", *overrides],
    )
    expected = load_recipe(DEMO / "alignmixup_ae.yaml", overrides)
    assert printed == expected
    assert (printed.train.epochs, printed.method.clean_prob) == (3, 0.5)
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_demo_print_config_is_its_three_recipes(capsys):
    printed = _printed(capsys, ["demo", "--print-config", "--output", "out", "train.epochs=2"])
    assert [r.method.name for r in printed] == ["baseline", "alignmixup", "alignmixup_ae"]
    for recipe, name in zip(printed, ("baseline", "alignmixup", "alignmixup_ae"), strict=True):
        assert recipe == load_recipe(
            DEMO / f"{name}.yaml",
            ["data.root=demo_data/digits", f"train.output_dir=out/{name}", "train.epochs=2"],
        )


def test_profile_takes_key_value_like_train_and_prints_each_methods_recipe(capsys):
    printed = _printed(
        capsys,
        [
            *("profile", "--methods", "baseline,alignmixup", "--device", "cpu", "--print-config"),
            *("method.sinkhorn=converged", "model.ae.decoder_width=16"),
        ],
    )
    assert [r.method.name for r in printed] == ["baseline", "alignmixup"]
    assert printed[1].method.sinkhorn == "converged"
    assert all(r.model.ae.decoder_width == 16 for r in printed)
    with pytest.raises(SystemExit):  # the old flag is gone: one syntax
        main(["profile", "--set", "method.sinkhorn=converged", "--print-config"])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, Recipe]:
    from pipeline.methods import build_method
    from pipeline.runs.checkpoints import TrainerState
    from pipeline.runs.model_file import model_facts, save_final_model

    recipe = load_recipe(DEMO / "baseline.yaml", ["model.name=test_resnet", "model.timm_kwargs={}"])
    model = build_method(recipe.method).build_model(recipe.model, 3)
    path = tmp_path_factory.mktemp("model") / "model_final.safetensors"
    save_final_model(path, model, recipe, model_facts(model, 3, list("abc")), TrainerState())
    return path, recipe


@pytest.mark.parametrize("command", ["eval", "wsol"])
def test_eval_and_wsol_print_the_checkpoints_recipe_with_overrides(command, capsys, model_file):
    path, recipe = model_file
    argv = [command, "--checkpoint", str(path), "--print-config", "data.val_crop=24"]
    if command == "wsol":
        argv[3:3] = ["--data", "unused"]
    (printed,) = _printed(capsys, argv)
    assert printed == recipe.model_copy(
        update={"data": recipe.data.model_copy(update={"val_crop": 24})}
    )


def test_tables_label_errors_and_accuracies_in_percent():
    from pipeline.evaluation.report import results_table
    from pipeline.tools.compare_table import columns_for
    from pipeline.training.summary import RunSummary, summary_table

    summary = RunSummary("r", "baseline", 10, 1, 1.0, 12.5, 2.0, 11.0, 5.0, 9.0, 1.0, None, ".")
    header = summary_table([summary]).splitlines()[0]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[4:7] == ["top-1 err (%)", "best (%)", "top-5 err (%)"]

    metrics = {
        "final/top1_err": 1.0,
        "final/best_top1_err": 1.0,
        "final/top5_err": 1.0,
        "eval/top1_err": 1.0,
        "eval/ece": 1.0,
        "eval/fgsm_err": 1.0,
        "eval/pgd_err": 1.0,
        "wsol/top1_loc": 1.0,
        "wsol/gt_known_loc": 1.0,
        "wsol/maxboxacc_v2": 1.0,
        "eval/ood/lsun/auroc": 1.0,
        "eval/ood/lsun/det_acc": 1.0,
    }
    columns = {c.key: c.header for c in columns_for([metrics])}
    for key in metrics:  # every one of them is a percentage when logged
        assert columns[key].endswith(" (%)"), (key, columns[key])
    assert not columns["num_params"].endswith("(%)")
    assert "value (%)" in results_table({"top1_err": 1.0}, "t").splitlines()[1]


def test_plots_label_error_axes_in_percent():
    from pipeline.tools.compare_plots import draw_error_vs_time, draw_val_curves
    from pipeline.training.curves import draw_curves

    run = draw_curves([(0, 2.0), (1, 1.0)], [(1, 50.0)], [(1, 10.0)], "r")
    assert run.axes[1].get_ylabel() == "validation error (%)"
    assert draw_val_curves({"a": [(1, 50.0)]}).axes[0].get_ylabel().endswith("(%)")
    row = {"perf/msec_per_batch": 10.0, "final/top1_err": 5.0, "run": "a"}
    assert draw_error_vs_time([row]).axes[0].get_ylabel().endswith("(%)")


def test_mlflow_runs_say_their_units(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.runs.tracking import DESCRIPTION_TAG, NewRun, Tracker

    uri = f"sqlite:///{tmp_path}/m.db"
    recipe = load_recipe(
        DEMO / "baseline.yaml", [f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    )
    tracker = Tracker(recipe.tracking, tmp_path / "run", enabled=True)
    tracker.start(NewRun("t", recipe.flat(), ""))
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    note = client.get_run(tracker.run_id).data.tags[DESCRIPTION_TAG]
    assert "percentage" in note and "val/*" in note and "milliseconds" in note


def test_timm_kwargs_reach_timm_and_bad_ones_are_named():
    from pipeline.errors import RecipeError
    from pipeline.models import build_model

    narrow = load_recipe(DEMO / "baseline.yaml").model  # the demo's half-width resnet10t
    model = build_model(narrow, 10)
    assert model.feature_channels == 256
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
    bad = narrow.model_copy(update={"timm_kwargs": {"widthh": 2}})
    with pytest.raises(RecipeError, match=r"model\.timm_kwargs\.widthh"):
        build_model(bad, 10)
    own = narrow.model_copy(update={"timm_kwargs": {"output_stride": 16}})
    with pytest.raises(RecipeError, match=r"model\.timm_kwargs\.output_stride"):
        build_model(own, 10)
