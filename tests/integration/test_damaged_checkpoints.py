"""Damaged checkpoints and mismatched model files, with real files: a resume passes over a
truncated or incomplete newest checkpoint to the newest one that loads, says so in one line and
keeps the damaged folder aside; a model file whose weights or recipe do not fit its header is
refused in one line naming the file (issue items 4 and 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline.errors import CheckpointError, TrainingError
from pipeline.methods import build_method
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import TrainerState, list_checkpoints, read_state
from pipeline.runs.model_file import FINAL_MODEL, load_model, model_facts, save_final_model
from pipeline.training import Trainer
from pipeline.training.step import StepOutput

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEP2, STEP4 = "step_00000002", "step_00000004"


def _overrides(digits_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        *TINY_OVERRIDES,
        f"data.root={digits_root}",
        f"train.output_dir={out}",
        "tracking.enabled=false",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(digits_root, tmp_path_factory) -> dict[str, Path]:
    """A run stopped at step 4 (checkpoints at steps 2 and 4), and the same run uninterrupted
    to step 6 (the reference a resume from step 2 must reproduce)."""
    root = tmp_path_factory.mktemp("damaged")
    for name, steps in (("base", 4), ("reference", 6)):
        Trainer(
            load_recipe(None, _overrides(digits_root, root / name, f"train.max_steps={steps}"))
        ).fit()
    assert [p.name for p in list_checkpoints(root / "base")] == [STEP2, STEP4]
    return {"base": root / "base", "reference": root / "reference"}


def _copy_run(runs: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs["base"], out)
    return out


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _zip_of_junk(path: Path) -> None:
    """A whole zip file that holds no torch state: only loading it tells."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("junk", "not a tensor")


@pytest.mark.parametrize(
    ("damaged_file", "damage", "cause"),
    [
        ("model.safetensors", _truncate, "truncated or corrupt"),
        ("optimizer.bin", _truncate, "truncated or corrupt"),
        ("model.safetensors", Path.unlink, "missing"),
        ("optimizer.bin", _zip_of_junk, "Accelerate could not load it"),
    ],
)
def test_resume_passes_over_a_damaged_newest_checkpoint(
    runs, digits_root, tmp_path, capsys, damaged_file, damage, cause
):
    out = _copy_run(runs, tmp_path)
    damage(out / "checkpoints" / STEP4 / damaged_file)
    summary = Trainer(load_recipe(None, _overrides(digits_root, out, "train.max_steps=6"))).fit()
    assert summary.steps == 6

    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if STEP4 in line]
    assert len(said) == 1, said  # one line: the damaged folder, its file and cause, the one used
    assert f"{STEP4}/{damaged_file}: " in said[0] and cause in said[0] and STEP2 in said[0]
    assert f"resumed from {out / 'checkpoints' / STEP2} " in printed
    # Kept aside under a name outside `step_*` (what slurm/launch.sh's glob and a resume search),
    # as it was; the checkpoints are those of the resumed run.
    aside = out / "checkpoints" / f"damaged-{STEP4}"
    assert aside.is_dir() and (aside / damaged_file).exists() == (cause != "missing")
    globbed = sorted(p.parent.name for p in out.glob("checkpoints/step_*/trainer_state.json"))
    assert globbed == [STEP2, STEP4, "step_00000006"]
    assert [read_state(out / "checkpoints" / name).step for name in globbed] == [2, 4, 6]
    # The run went on from step 2 exactly: the weights of the uninterrupted run.
    got, want = (load_file(str(d / FINAL_MODEL)) for d in (out, runs["reference"]))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_no_loadable_checkpoint_is_one_line_naming_each_and_exit_2(
    runs, digits_root, tmp_path, capsys
):
    out = _copy_run(runs, tmp_path)
    _truncate(out / "checkpoints" / STEP4 / "model.safetensors")
    (out / "checkpoints" / STEP2 / "optimizer.bin").write_bytes(b"")
    recipe_file = out / "checkpoints" / STEP2 / "recipe.yaml"
    argv = ["train", "--recipe", str(recipe_file), f"train.output_dir={out}", "train.max_steps=6"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{STEP4}/model.safetensors: " in err and f"{STEP2}/optimizer.bin: " in err
    # Nothing is set aside when nothing loads: the folders are as they were.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [STEP2, STEP4]


def test_a_non_finite_loss_names_the_checkpoint_saved_before_it(
    runs, digits_root, tmp_path, monkeypatch
):
    """Resumed from step 2 of a run that has a step-4 checkpoint: the loss is NaN at step 4, so
    the last good checkpoint is step 2's, not the newer step 4 of the earlier run."""
    import pipeline.training.trainer as trainer_module

    out = _copy_run(runs, tmp_path)
    real_step = trainer_module.train_step
    calls = []

    def nan_at_step_4(*args, **kwargs) -> StepOutput:
        calls.append(None)
        step = real_step(*args, **kwargs)
        return StepOutput(step.loss * float("nan"), step.stats) if len(calls) == 2 else step

    monkeypatch.setattr(trainer_module, "train_step", nan_at_step_4)
    resume = f"train.resume={out / 'checkpoints' / STEP2}"
    recipe = load_recipe(None, _overrides(digits_root, out, "train.max_steps=6", resume))
    with pytest.raises(TrainingError, match="at step 4") as err:
        Trainer(recipe).fit()
    assert f"last good checkpoint: {out / 'checkpoints' / STEP2}" in str(err.value)


# ------------------------------------------------------------------- mismatched model files
def _model_file(tmp_path: Path) -> Path:
    """A real model file of a tiny 10-class model, as training writes it."""
    recipe = load_recipe(None, ["model.name=test_resnet", "model.timm_kwargs={}"])
    model = build_method(recipe.method).build_model(recipe.model, 10)
    path = tmp_path / "model.safetensors"
    save_final_model(
        path, model, recipe, model_facts(model, 10, list("0123456789")), TrainerState()
    )
    return path


def _rewrite(
    path: Path, name: str, tensors=None, header=None, raw_header: str | None = None
) -> Path:
    """A copy `name` of model file `path` with some tensors replaced or its header's facts
    edited (`header`) or replaced (`raw_header`)."""
    with safe_open(str(path), framework="pt") as fh:
        facts = json.loads(fh.metadata()["alignmixup_pipeline"])
    weights = {**load_file(str(path)), **(tensors or {})}
    text = raw_header if raw_header is not None else json.dumps({**facts, **(header or {})})
    out = path.with_name(f"{name}.safetensors")
    save_file(weights, str(out), metadata={"alignmixup_pipeline": text})
    return out


def test_weights_that_do_not_fit_the_header_are_one_line_naming_them(tmp_path):
    path = _model_file(tmp_path)
    saved = load_file(str(path))
    width = saved["classifier.weight"].shape[1]
    with safe_open(str(path), framework="pt") as fh:
        recipe = json.loads(fh.metadata()["alignmixup_pipeline"])["recipe"]
    narrow = json.loads(json.dumps(recipe))
    narrow["model"]["timm_kwargs"] = {"channels": [32, 48, 48, 64]}  # another last width
    unknown = json.loads(json.dumps(recipe))
    unknown["model"]["colour"] = "red"

    smaller = saved["classifier.weight"][:, :8].contiguous()
    cases = [  # (file name, tensors replaced, header facts changed, what is said, a detail)
        # the header says 100 classes, the file holds 10
        ("classes", {}, {"num_classes": 100}, "2 weights do not fit", (
            f"classifier.weight is [10, {width}] in the file, [100, {width}] in the model"
        )),
        # one tensor of another shape
        ("shape", {"classifier.weight": smaller}, {}, "1 weight does not fit", (
            f"classifier.weight is [10, 8] in the file, [10, {width}] in the model"
        )),
        # the header describes another width
        ("width", {}, {"recipe": narrow}, "weights do not fit", (
            f"classifier.weight is [10, {width}] in the file, [10, 64] in the model"
        )),
        ("key", {}, {"recipe": unknown}, "the recipe in its header is invalid", "model.colour"),
        ("yaml", {}, {"recipe": "model: {name: [unclosed"}, "recipe in its header is a str", ""),
    ]  # fmt: skip
    for name, tensors, header, what, detail in cases:
        altered = _rewrite(path, name, tensors, header)
        with pytest.raises(CheckpointError) as err:
            load_model(altered)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{altered}: "), message
        assert what in message and detail in message, message
    # a header that is no JSON
    altered = _rewrite(path, "json", raw_header='{"num_classes": 10, "recipe": {')
    with pytest.raises(
        CheckpointError, match=r"^[^\n]*: the facts in its header are not valid JSON"
    ):
        load_model(altered)


def test_eval_of_a_mismatched_model_file_exits_2_with_one_line(tmp_path, subprocess_env):
    altered = _rewrite(_model_file(tmp_path), "classes", header={"num_classes": 100})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "eval", "--checkpoint", str(altered), "--no-mlflow"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(altered) in proc.stderr and "classifier.weight is [10, " in proc.stderr
