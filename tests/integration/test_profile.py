"""`profile` on a tiny CPU setting: JSON records, parameter counts, the MLflow run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.methods import build_method, method_names
from pipeline.recipe import load_recipe
from pipeline.tools import profile as profile_cmd
from pipeline.tools.benchmark import recipe_for


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    profile_cmd.register(parser.add_subparsers())
    return parser.parse_args(["profile", *argv])


# timm's test_resnet and a narrow decoder keep seven models at a few ms per step.
TINY = ["--model", "test_resnet", "--size", "32", "--batch", "4", "--steps", "2", "--warmup", "1"]
# One thread: on a loaded 2-core machine two OpenMP threads can make each step 10× slower.
TINY += ["--device", "cpu", "--num-classes", "10", "--threads", "1"]
# Recipe overrides, `key=value` after the options as every command takes them.
SMALL_AE = ["model.ae.decoder_width=16", "model.ae.decoder_min_width=8"]
# The paper's Table 2 order, the methods it did not time beside their kin; others after, by name.
PAPER_ORDER = [
    "baseline",
    "input_mixup",
    "cutmix",
    "manifold_mixup",
    "puzzlemix",
    "saliencymix",
    "resizemix",
    "fmix",
    "alignmixup",
    "alignmixup_ae",
    "alignmixup_or_cutmix",
]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """All seven methods profiled once, with JSON output and an MLflow run in a SQLite store."""
    root = tmp_path_factory.mktemp("profile")
    uri = f"sqlite:///{root}/mlflow.db"
    out = root / "profile.json"
    # MLflow puts a new experiment's artifacts in ./mlruns: keep them in the tmp folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["profile", *TINY, "--output", str(out), "--tracking-uri", uri, *SMALL_AE]) == 0
    return json.loads(out.read_text()), uri


def test_one_record_per_method_with_positive_times(profiled):
    records, _ = profiled
    others = sorted(set(method_names()) - set(PAPER_ORDER))  # registered by other tests
    assert [r["method"] for r in records] == PAPER_ORDER + others
    assert records[0]["settings"]["threads"] == 1
    for r in records:
        assert r["msec_per_batch"] > 0 and r["images_per_s"] > 0, r["method"]
        assert len(r["msec_steps"]) == 2 and min(r["msec_steps"]) > 0
        assert r["msec_per_batch"] == pytest.approx(sum(r["msec_steps"]) / 2)  # median of two
        assert r["msec_iqr"] >= 0
        assert r["images_per_s"] == pytest.approx(4 / r["msec_per_batch"] * 1e3)
        assert r["device"] == "cpu"
        assert r["settings"]["size"] == 32 and r["settings"]["batch"] == 4
    by = {r["method"]: r for r in records}
    assert by["baseline"]["ratio_to_baseline"] == 1.0
    for r in records:
        expected = r["msec_per_batch"] / by["baseline"]["msec_per_batch"]
        assert r["ratio_to_baseline"] == pytest.approx(expected)
    # the baseline's own hook does no mixing, so it has no sections to time
    assert by["baseline"]["hook_msec"] == 0.0
    assert by["input_mixup"]["hook_section_calls"] == {"mix": 2}
    assert by["puzzlemix"]["hook_section_calls"] == dict.fromkeys(
        ("graphcut", "mix", "saliency", "transport"), 2
    )
    # CutMix or AlignMixup each step, under the composite's name: one section per step
    composite = by["alignmixup_or_cutmix"]["hook_section_calls"]
    assert set(composite) <= {"align", "mix"} and sum(composite.values()) == 2
    for r in records:  # on a CPU the section's time is the host's time in it
        assert r["hook_sections_host_msec_per_step"] == r["hook_sections_msec_per_step"]
        assert r["hook_msec"] == pytest.approx(sum(r["hook_sections_msec_per_step"].values()))
    for method in ("alignmixup", "alignmixup_ae", "alignmixup_or_cutmix"):
        assert by[method]["sinkhorn_msec_per_call"] > 0
        assert by[method]["align_mix_msec_per_call"] > 0
        assert 1 <= by[method]["sinkhorn_iterations"] <= 100  # method.sinkhorn_max_iter
    assert "sinkhorn_msec_per_call" not in by["cutmix"]


def test_parameter_counts(profiled):
    records, _ = profiled
    by = {r["method"]: r for r in records}
    reference = sum(
        p.numel() for p in timm.create_model("test_resnet", num_classes=10).parameters()
    )
    for method in method_names():
        if method != "alignmixup_ae":
            assert by[method]["params"] == reference, method
    assert by["alignmixup_ae"]["params"] > reference  # f and the decoder


def test_mlflow_run_holds_the_table(profiled):
    from mlflow.tracking import MlflowClient

    records, uri = profiled
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("profile")
    (run,) = client.search_runs([exp.experiment_id])
    for r in records:
        assert run.data.metrics[f"{r['method']}/msec_per_batch"] == r["msec_per_batch"]
        assert run.data.metrics[f"{r['method']}/params"] == r["params"]
    assert run.data.params["model"] == "test_resnet"
    dirty = run.data.tags["pipeline.git.dirty"] == "true"  # then the diff is logged as code/
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "profile.md",
        "profile.json",
    } | ({"code"} if dirty else set())
    text = (Path(client.download_artifacts(run.info.run_id, "profile.md"))).read_text()
    assert "paper × baseline" in text  # the Table 2 comparison is in the logged table


def test_a_method_override_reaches_the_methods_that_have_the_key():
    args = _args(*TINY, "--methods", "baseline,alignmixup", *SMALL_AE, "method.sinkhorn=converged")
    settings = profile_cmd.settings_from_args(args)
    assert recipe_for("alignmixup", settings).method.sinkhorn == "converged"
    assert recipe_for("baseline", settings).method == load_recipe(None).method
    assert recipe_for("baseline", settings).model.ae.decoder_width == 16  # the other override


def test_subset_without_baseline_has_no_ratio(tmp_path):
    out = tmp_path / "p.json"
    args = _args(*TINY, "--steps", "1", "--methods", "cutmix", "--output", str(out), "--no-mlflow")
    assert args.func(args) == 0
    (record,) = json.loads(out.read_text())
    assert record["method"] == "cutmix" and record["ratio_to_baseline"] is None


def test_epoch_time_is_the_steps_of_an_epoch_at_the_measured_speed(tmp_path):
    out = tmp_path / "p.json"
    args = _args(*TINY, "--methods", "baseline", "--epoch-images", "10", "--output", str(out))
    assert _args(*TINY, "--no-mlflow").epoch_images is None
    args.no_mlflow = True
    assert args.func(args) == 0
    (record,) = json.loads(out.read_text())
    # 10 images at --batch 4: 3 steps (the last one short, timed as a full one).
    assert record["epoch_s"] == pytest.approx(3 * record["msec_per_batch"] / 1000)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--methods", "baseline,mixupp"], "mixupp"),
        (["--methods", "cutmix,baseline,cutmix"], "cutmix named more than once"),
        (["--steps", "0"], "--steps"),
        (["--device", "tpu"], "tpu"),
        (["method.sinkhorn=fast"], "method.sinkhorn"),
        (["--epoch-images", "0"], "--epoch-images"),
        (["--methods", "baseline,cutmix", "method.sinkhorn=authors"], "none of the"),
    ],
)
def test_bad_options_are_named(argv, match):
    args = _args(*TINY, "--no-mlflow", *argv)
    with pytest.raises(PipelineError, match=match):
        args.func(args)


def test_table2_sets_each_method_beside_the_papers_figures():
    """Paper ratios are its msec/batch over the baseline's 418 (worked by hand: PuzzleMix
    846 / 418 = 2.024, AlignMixup/AE 688 / 418 = 1.646); a method the paper lacks gets dashes."""
    records = [
        {"method": m, "params": 25_557_032, "msec_per_batch": ms, "ratio_to_baseline": ms / 100}
        for m, ms in (("baseline", 100.0), ("puzzlemix", 250.0), ("alignmixup_ae", 160.0))
    ] + [
        {"method": "fmix", "params": 25_557_032, "msec_per_batch": 101.0, "ratio_to_baseline": 1.01}
    ]
    lines = profile_cmd.format_table2(records).splitlines()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
    }
    assert rows["puzzlemix"] == ["25.56M", "25M", "250.0", "846", "2.500", "2.024", "21.24"]
    assert rows["alignmixup_ae"][1:] == ["35M", "160.0", "688", "1.600", "1.646", "18.83"]
    assert rows["baseline"][-2:] == ["1.000", "23.68"]
    assert rows["fmix"][1] == rows["fmix"][3] == rows["fmix"][5] == rows["fmix"][6] == "–"


class RangeNames(TorchDispatchMode):
    """The names of the profiler ranges opened under it (their enter op carries the name)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.profiler._record_function_enter_new.default:
            self.names.append(args[0])
        return func(*args, **(kwargs or {}))


def test_sections_are_profiler_ranges_that_cost_no_op_when_no_profiler_runs():
    method = build_method(load_recipe(None, ["method.name=input_mixup"]).method)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    plain = RangeNames()
    with plain:
        method(model, x, y, torch.Generator().manual_seed(0))
    assert plain.names == []  # training: no range, not even an op for one
    with profile() as prof, RangeNames() as profiled:
        method(model, x, y, torch.Generator().manual_seed(0))
    assert profiled.names == ["input_mixup/mix"]
    assert [e.count for e in prof.key_averages() if e.key == "input_mixup/mix"] == [1]
