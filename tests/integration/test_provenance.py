"""Every MLflow run the pipeline creates (train, eval, profile, compare) says where it comes from:
MLflow's source tags (the UI's Source and User), the git commit and a dirty tree's diff, package
versions, host, GPUs, world size, the command line and the Slurm job. Read back from a real
SQLite store and checked against references taken here: git run by the test, getpass, socket,
the packages' own versions, the environment the test sets. And `compare` logs into an
experiment of its own, never among the runs it compares."""

from __future__ import annotations

import csv
import getpass
import importlib.metadata
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import accelerate
import mlflow
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from pipeline.recipe import load_recipe
from pipeline.runs import provenance
from pipeline.tools import compare as compare_cmd

REPO = Path(__file__).resolve().parents[2]
MAIN = str(REPO / "pipeline" / "__main__.py")  # sys.argv[0] under `python -m pipeline`
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_ARRAY_JOB_ID": "4240",
    "SLURM_ARRAY_TASK_ID": "2",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
}


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _dirty(repo: Path) -> str:
    """Whether the checkout's tracked files differ from its HEAD, as the tag says it."""
    differs = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD"]).returncode
    return "true" if differs else "false"


def _artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def _no_slurm(monkeypatch) -> None:
    for var in SLURM:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def dirty_checkout(tmp_path, monkeypatch) -> Path:
    """A git checkout with one commit and an uncommitted change, made the pipeline's checkout."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / "train.py").write_text("lr = 0.1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "train.py")
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    _git(repo, *identity, "commit", "-q", "-m", "first")
    (repo / "train.py").write_text("lr = 0.2\n")
    monkeypatch.setattr(provenance, "REPO", repo)
    return repo


def test_a_training_run_names_its_code_job_and_machine(
    tiny_overrides, mlflow_uri, dirty_checkout, monkeypatch, tmp_path, one_torch_thread, capsys
):
    from pipeline.training import Trainer

    for var, value in SLURM.items():
        monkeypatch.setenv(var, value)
    argv = [MAIN, "train", "--recipe", "my recipe.yaml", "train.max_steps=2"]
    monkeypatch.setattr(sys, "argv", argv)
    recipe = load_recipe(
        None, tiny_overrides("name=prov", "train.max_steps=2", "tracking.experiment=t_provenance")
    )
    summary = Trainer(recipe).fit()
    said = capsys.readouterr().out.splitlines()[0]  # which store, first
    assert said == f"MLflow store: {mlflow_uri} (experiment 't_provenance')"

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(summary.mlflow_run_id)
    tags = run.data.tags
    # MLflow's own source tags: the UI's Source and User
    assert tags["mlflow.source.name"] == "python -m pipeline train"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == _git(dirty_checkout, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == _git(dirty_checkout, "branch", "--show-current")
    assert tags["mlflow.user"] == getpass.getuser()
    # the job and the machine
    assert tags["pipeline.command"] == (
        "python -m pipeline train --recipe 'my recipe.yaml' train.max_steps=2"
    )
    assert {k: v for k, v in tags.items() if k.startswith("slurm.")} == {
        "slurm.job_id": "4242",
        "slurm.array_job_id": "4240",
        "slurm.array_task_id": "2",
        "slurm.job_nodelist": "gpu[01-02]",
    }
    assert tags["pipeline.hosts"] == socket.gethostname()
    assert tags["pipeline.world_size"] == run.data.params["world_size"] == "1"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert tags["pipeline.gpu.count"] == str(gpus)
    # the software
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'\nversion = "([^"]+)"', pyproject)[1] == tags["pipeline.version"]
    assert tags["pipeline.version.torch"] == torch.__version__
    assert tags["pipeline.version.cuda"] == (torch.version.cuda or "none")
    assert tags["pipeline.version.timm"] == timm.__version__
    assert tags["pipeline.version.accelerate"] == accelerate.__version__
    assert tags["pipeline.version.mlflow"] == mlflow.__version__
    assert tags["pipeline.version.dali"]
    assert tags["method"] == recipe.method.name and tags["model"] == recipe.model.name
    # the uncommitted change, as a patch that undoes cleanly on the checkout
    assert tags["pipeline.git.dirty"] == "true"
    patch = Path(client.download_artifacts(run.info.run_id, "code/git_diff.patch", str(tmp_path)))
    text = patch.read_text()
    assert "-lr = 0.1" in text and "+lr = 0.2" in text
    _git(dirty_checkout, "apply", "--check", "--reverse", str(patch))
    kept = Path(summary.output_dir) / "tracking" / "git_diff.patch"
    assert kept.read_text() == text  # the run folder keeps it too (what the journal sends)


def test_compare_logs_apart_from_the_runs_it_compares(mlflow_uri, tmp_path, subprocess_env):
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp_id = client.create_experiment("t_prov_cmp", artifact_location=str(tmp_path / "art"))
    trained = client.create_run(exp_id, run_name="trained").info.run_id
    client.log_param(trained, "method.name", "baseline")
    for step, value in enumerate([50.0, 40.0]):
        client.log_metric(trained, "val/top1_err", value, step=step)
    client.log_metric(trained, "final/top1_err", 40.0)
    client.log_metric(trained, "perf/msec_per_batch", 12.0)
    client.set_terminated(trained)
    # what earlier versions left among the training runs: a tagged compare run
    old = client.create_run(exp_id, run_name="compare", tags={"pipeline.kind": "compare"})
    client.set_terminated(old.info.run_id)

    files = compare_cmd.compare("t_prov_cmp", tmp_path / "first", mlflow_uri)
    with open(files["csv"], newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == ["trained"]
    # again, from the command line in a Slurm job: the same run, its provenance now this one's
    command = [sys.executable, "-m", "pipeline", "compare", "--experiment", "t_prov_cmp"]
    command += ["--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / "again")]
    done = subprocess.run(
        command, env={**subprocess_env, **SLURM}, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"MLflow store: {mlflow_uri}"  # which store, first

    assert {r.info.run_id for r in client.search_runs([exp_id])} == {trained, old.info.run_id}
    compare_exp = client.get_experiment_by_name("t_prov_cmp/compare")
    (run,) = client.search_runs([compare_exp.experiment_id])
    assert run.info.run_id != old.info.run_id
    assert _artifacts(client, run.info.run_id, "compare") == {
        f"compare/{name}"
        for name in ("comparison.md", "comparison.csv", "val_curves.png", "error_vs_time.png")
    }
    tags = run.data.tags
    assert tags["pipeline.kind"] == "compare"
    assert tags["pipeline.compared_experiment"] == "t_prov_cmp"
    assert tags["mlflow.source.name"] == "python -m pipeline compare"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == _git(REPO, "rev-parse", "HEAD")
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["slurm.job_id"] == "4242"
    assert tags["pipeline.command"].startswith("python -m pipeline compare --experiment t_prov_cmp")
    assert tags["pipeline.git.dirty"] == _dirty(REPO)
    assert ("code/git_diff.patch" in _artifacts(client, run.info.run_id, "code")) == (
        tags["pipeline.git.dirty"] == "true"
    )


def test_an_eval_run_of_a_lone_model_file_names_its_source(mlflow_uri, tmp_path, monkeypatch):
    from pipeline.evaluation.report import log_results

    _no_slurm(monkeypatch)
    monkeypatch.setattr(sys, "argv", [MAIN, "eval", "--checkpoint", "model.safetensors"])
    recipe = load_recipe(
        None, [f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=t_prov_eval"]
    )
    said = log_results(recipe, {}, tmp_path / "model.safetensors", {"eval/top1_err": 12.5})
    run_id = said.removeprefix("logged to mlflow run ")

    client = MlflowClient(tracking_uri=mlflow_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["pipeline.kind"] == "evaluation"
    assert tags["mlflow.source.name"] == "python -m pipeline eval"
    assert tags["mlflow.source.git.commit"] == _git(REPO, "rev-parse", "HEAD")
    assert tags["mlflow.user"] == getpass.getuser()
    assert not [k for k in tags if k.startswith("slurm.")]  # not in a Slurm job
    assert tags["pipeline.git.dirty"] == _dirty(REPO)
    assert ("code/git_diff.patch" in _artifacts(client, run_id, "code")) == (
        tags["pipeline.git.dirty"] == "true"
    )


def test_a_profile_run_outside_a_checkout_without_some_packages(mlflow_uri, tmp_path, monkeypatch):
    from pipeline.tools.benchmark import Settings
    from pipeline.tools.profile import log_to_mlflow

    _no_slurm(monkeypatch)
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # no git checkout here
    real_version = importlib.metadata.version

    def version(name: str) -> str:  # timm and Accelerate as if not installed
        if name in ("timm", "accelerate"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    real_dists = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(  # nor DALI
        importlib.metadata,
        "distributions",
        lambda: [d for d in real_dists() if "dali" not in (d.metadata["Name"] or "").lower()],
    )
    long_override = "model.ae.note=" + "x" * 6000
    monkeypatch.setattr(sys, "argv", [MAIN, "profile", "--device", "cpu", long_override])
    settings = Settings(
        methods=["baseline"], model="test_resnet", size=32, batch=4, amp="no", steps=2,
        warmup=1, channels_last=False, compile=False, device="cpu",
    )  # fmt: skip
    record = {"method": "baseline", "params": 1000, "msec_per_batch": 3.5}
    run_id = log_to_mlflow([record], "table", settings, "t_prov_profile", mlflow_uri)

    client = MlflowClient(tracking_uri=mlflow_uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "python -m pipeline profile"
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.commit"] == "unknown"
    assert tags["pipeline.git.dirty"] == "unknown"
    assert "code" not in _artifacts(client, run_id)
    for package in ("timm", "accelerate", "dali"):
        assert tags[f"pipeline.version.{package}"] == "not installed"
    assert tags["pipeline.version.torch"] == torch.__version__
    command = tags["pipeline.command"]  # MLflow's 5000-character tag limit, cut visibly
    assert len(command) == 5000 and command.startswith("python -m pipeline profile --device cpu")
    assert command.endswith("...")
    assert json.loads(
        Path(client.download_artifacts(run_id, "profile.json", str(tmp_path))).read_text()
    ) == [record]
