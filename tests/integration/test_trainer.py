"""The trainer end to end on the digits: tracking, checkpoints, resume after SIGKILL, preemption,
NaN losses, bad input, and a real two-process gloo DDP run."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.errors import TrainingError
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import list_checkpoints, read_state
from pipeline.runs.model_file import FINAL_MODEL, load_model, read_weights
from pipeline.training import Trainer
from pipeline.training.preempt import EXIT_PREEMPTED, STOP_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _losses(uri: str, run_id: str) -> dict[int, float]:
    """train/loss per step, the last value logged at each step (a resumed run re-logs some)."""
    client = MlflowClient(tracking_uri=uri)
    points = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in points}


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _train_cmd(overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--recipe",
        "recipes/demo/baseline.yaml",
        *overrides,
    ]


def _train_cli(overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        _train_cmd(overrides), env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_run_finishes_tracked_and_reloadable(tiny_overrides, mlflow_uri, tmp_path):
    recipe = load_recipe(
        None,
        tiny_overrides(
            "name=finish",
            "data.backend=dali",  # the real default: DALI's CPU-only pipeline
            "method.name=alignmixup",
            "train.max_steps=6",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=2",
            "tracking.experiment=t_finish",
        ),
    )
    summary = Trainer(recipe).fit()
    assert summary.steps == 6 and summary.top1_err is not None

    run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "alignmixup"
    assert run.data.params["method.sinkhorn"] == "authors"  # the method's own settings only
    assert "method.clean_prob" not in run.data.params and "method.levels" not in run.data.params
    # the method's stats, averaged per log window: λ in (0, 1), aligned a share of batches
    assert 0 < run.data.metrics["method/lam"] < 1
    assert 0 <= run.data.metrics["method/aligned"] <= 1
    assert int(run.data.params["num_params"]) == summary.params
    assert run.data.metrics["final/top1_err"] == pytest.approx(summary.top1_err)
    assert sorted(_losses(mlflow_uri, run.info.run_id)) == [1, 2, 3, 4, 5, 6]
    artifacts = {
        a.path for a in MlflowClient(tracking_uri=mlflow_uri).list_artifacts(run.info.run_id)
    }
    assert {"recipe.yaml", "curves.png"} <= artifacts

    # keep_checkpoints=2: only the newest two, each complete.
    ckpts = list_checkpoints(recipe.train.output_dir)
    assert [p.name for p in ckpts] == ["step_00000004", "step_00000006"]
    assert read_state(ckpts[-1]).finished

    # The final model file rebuilds the same network: same val error as the run reported.
    model, loaded_recipe, extra = load_model(Path(recipe.train.output_dir) / FINAL_MODEL)
    assert loaded_recipe == recipe and extra["mlflow_run_id"] == summary.mlflow_run_id
    from pipeline.data import build_loaders

    loaders = build_loaders(recipe.data, 0, 1, "cpu", recipe.train.seed)
    wrong = total = 0
    with torch.no_grad():
        for images, labels in loaders.val:
            keep = labels >= 0
            wrong += (model(images).argmax(1)[keep] != labels[keep]).sum().item()
            total += keep.sum().item()
    assert 100.0 * wrong / total == pytest.approx(summary.top1_err, abs=1e-4)

    # Running the finished recipe again does nothing and keeps the run FINISHED.
    again = Trainer(recipe).fit()
    assert again.steps == 6
    assert (
        MlflowClient(tracking_uri=mlflow_uri).get_run(summary.mlflow_run_id).info.status
        == "FINISHED"
    )


# (torchvision, 1) is the intersection of the two cases kept: DALI without accumulation and
# torchvision with it (each run is ~50 s of real processes on 2 cores).
@pytest.mark.parametrize(("backend", "accum"), [("dali", 1), ("torchvision", 2)], ids=str)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    backend, accum, tiny_overrides, mlflow_uri, subprocess_env
):
    # With accumulation (2 micro-batches a step) checkpoints fall between optimiser steps and
    # the kill lands at any micro-batch: the resumed losses must still be the uninterrupted ones.
    # That variant also keeps an EMA, which must come out of the kill and resume unchanged.
    experiment = f"t_kill_{backend}_{accum}"
    common = [
        "method.name=alignmixup",
        f"data.backend={backend}",
        f"train.grad_accum_steps={accum}",
        *(["train.ema_decay=0.9"] if accum > 1 else []),
        "train.max_steps=12",
        "train.checkpoint_every=4",
        f"tracking.experiment={experiment}",
    ]
    reference = _train_cli(
        tiny_overrides(*common, "name=uninterrupted", output="ref"), subprocess_env
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    overrides = tiny_overrides(*common, "name=killed", output="killed")
    out_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir")))
    proc = subprocess.Popen(
        _train_cmd(overrides),
        env=subprocess_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (out_dir / "checkpoints" / "step_00000008").is_dir():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-epoch: an epoch here is 90 steps
    proc.wait()
    _assert_no_children_left(proc.pid)
    state = read_state(list_checkpoints(out_dir)[-1])
    assert state.step >= 8 and state.step < 12 and state.epoch == 0

    resumed = _train_cli(overrides, subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    runs = {r.info.run_name: r for r in _runs(mlflow_uri, experiment)}
    assert set(runs) == {"uninterrupted", "killed"}  # the resume continued the same run
    # the checkpoint names the run once the sender has created it (under load, maybe later)
    assert state.mlflow_run_id in (None, runs["killed"].info.run_id)
    assert runs["killed"].info.status == "FINISHED"
    ref = _losses(mlflow_uri, runs["uninterrupted"].info.run_id)
    got = _losses(mlflow_uri, runs["killed"].info.run_id)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    if accum > 1:
        ref_dir = out_dir.parent / "ref"
        ema_ref, ema_got = (read_weights(d / FINAL_MODEL, "ema")[0] for d in (ref_dir, out_dir))
        for name, value in ema_ref.items():
            torch.testing.assert_close(ema_got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _assert_no_children_left(pid: int, timeout: float = 10.0) -> None:
    """The killed trainer's worker processes (DALI's augmentation draws) end with it."""
    import psutil

    deadline = time.time() + timeout
    while True:
        left = [p for p in psutil.process_iter(["ppid", "cmdline"]) if p.info["ppid"] == pid]
        orphans = [
            p
            for p in psutil.process_iter(["ppid", "cmdline"])
            if p.info["ppid"] == 1
            and "pipeline" in " ".join(p.info["cmdline"] or [])
            and "train" in " ".join(p.info["cmdline"] or [])
        ]
        if not left and not orphans:
            return
        assert time.time() < deadline, f"processes left after the kill: {left + orphans}"
        time.sleep(0.2)


def test_preemption_checkpoints_exits_3_and_resumes(tiny_overrides, mlflow_uri, subprocess_env):
    overrides = tiny_overrides(
        "name=preempted",
        "train.max_steps=6",
        "train.preempt_check_every=2",
        "tracking.experiment=t_preempt",
    )
    out_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir")))
    out_dir.mkdir(parents=True)
    (out_dir / STOP_FILE).touch()  # as the Slurm script does when USR1 arrives
    first = _train_cli(overrides, subprocess_env)
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out_dir)] == ["step_00000002"]
    assert not (out_dir / STOP_FILE).exists()

    second = _train_cli(overrides, subprocess_env)
    assert second.returncode == 0, second.stderr[-2000:]
    (run,) = _runs(mlflow_uri, "t_preempt")
    assert run.info.status == "FINISHED"
    assert sorted(_losses(mlflow_uri, run.info.run_id)) == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_method_and_accepts_a_longer_run(
    tiny_overrides, mlflow_uri, subprocess_env
):
    overrides = tiny_overrides("name=changed", "train.max_steps=2", "tracking.experiment=t_chg")
    assert _train_cli(overrides, subprocess_env).returncode == 0
    changed = _train_cli([*overrides, "method.name=cutmix"], subprocess_env)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "method.name: 'baseline' → 'cutmix'" in changed.stderr
    assert "method.alpha (new key, set to 1.0)" in changed.stderr  # cutmix's own key
    longer = _train_cli([*overrides, "train.max_steps=4", "train.log_every=2"], subprocess_env)
    assert longer.returncode == 0, longer.stderr[-2000:]
    (run,) = _runs(mlflow_uri, "t_chg")  # the same run, continued
    assert sorted(_losses(mlflow_uri, run.info.run_id)) == [1, 2, 4]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (a real filesystem that fills up), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_keeps_the_last_checkpoint_and_resumes(
    tiny_overrides, mlflow_uri, subprocess_env, small_disk
):
    out = small_disk / "run"
    overrides = [
        *tiny_overrides("name=full", "train.max_steps=6", "train.preempt_check_every=2",
                        "train.checkpoint_every=4", "tracking.experiment=t_full"),
        f"train.output_dir={out}",
    ]  # fmt: skip
    out.mkdir()
    (out / STOP_FILE).touch()
    assert _train_cli(overrides, subprocess_env).returncode == EXIT_PREEMPTED  # step 2 saved
    (kept,) = list_checkpoints(out)
    size = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for half of one
    full = _train_cli(overrides, subprocess_env)
    assert full.returncode == 4, full.stderr[-2000:]
    (line,) = [x for x in full.stderr.splitlines() if x.startswith("error:")]
    assert f"checkpoint {out / 'checkpoints' / 'step_00000004'}" in line
    assert "No space left on device" in line or "no space left" in line
    assert "MiB free there" in line and "Traceback" not in full.stderr
    assert list_checkpoints(out) == [kept] and not list((out / "checkpoints").glob(".tmp-*"))
    (run,) = _runs(mlflow_uri, "t_full")
    assert run.info.status == "FAILED" and "could not be written" in run.data.tags["failure"]
    (small_disk / "filler").unlink()
    resumed = _train_cli(overrides, subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_state(list_checkpoints(out)[-1]).step == 6


def test_resume_and_eval_accept_an_mlflow_run_id(
    tiny_overrides, mlflow_uri, subprocess_env, monkeypatch, capsys
):
    overrides = tiny_overrides(
        "name=by_id", "train.max_steps=4", "train.preempt_check_every=2",
        "tracking.experiment=t_by_id",
    )  # fmt: skip
    out_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir")))
    out_dir.mkdir(parents=True)
    (out_dir / STOP_FILE).touch()
    assert _train_cli(overrides, subprocess_env).returncode == EXIT_PREEMPTED
    (run,) = _runs(mlflow_uri, "t_by_id")
    resumed = _train_cli([*overrides, f"train.resume={run.info.run_id}"], subprocess_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out_dir / 'checkpoints' / 'step_00000002'}" in resumed.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    argv = ["eval", "--checkpoint", run.info.run_id, "--suite", "classify", "--no-mlflow"]
    assert main(argv) == 0
    assert "top1_err" in capsys.readouterr().out
    bogus = _train_cli([*overrides, "train.resume=" + "f" * 32], subprocess_env)
    assert bogus.returncode == 2 and "no MLflow run with that id" in bogus.stderr


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tiny_overrides, mlflow_uri):
    recipe = load_recipe(
        None,
        tiny_overrides(
            "name=nan",
            "optim.lr=1.0e+30",
            "train.max_steps=20",
            "train.checkpoint_every=1",
            "tracking.experiment=t_nan",
        ),
    )
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+)") as err:
        Trainer(recipe).fit()
    bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
    (run,) = _runs(mlflow_uri, "t_nan")
    losses = _losses(mlflow_uri, run.info.run_id)
    # Every logged step before the bad one is finite, and the newest checkpoint is the one before.
    assert sorted(losses) == list(range(1, bad_step))
    assert all(v == v and abs(v) != float("inf") for v in losses.values())
    assert read_state(list_checkpoints(recipe.train.output_dir)[-1]).step == bad_step - 1
    assert f"step_{bad_step - 1:08d}" in str(err.value)
    assert run.info.status == "FAILED"


def test_bad_recipe_and_missing_data_exit_2_with_named_errors(
    tiny_overrides, subprocess_env, tmp_path
):
    bad = _train_cli(tiny_overrides("optim.lrr=0.1"), subprocess_env)
    assert bad.returncode == 2 and "unknown key 'optim.lrr'" in bad.stderr
    missing = _train_cli(tiny_overrides(f"data.root={tmp_path / 'no_such_data'}"), subprocess_env)
    assert missing.returncode == 2 and "no_such_data" in missing.stderr
    assert "Traceback" not in missing.stderr


DDP_SCRIPT = """
import sys, torch
from pipeline.recipe import load_recipe
from pipeline.training import Trainer
trainer = Trainer(load_recipe(None, sys.argv[2:]))
rank = trainer.accelerator.process_index
assert trainer.parts.method.context.rank == rank  # what method.draws=per_rank draws apart
snapshot = lambda: {k: v.detach().clone() for k, v in trainer.parts.model.named_parameters()}
torch.save(snapshot(), f"{sys.argv[1]}/initial{rank}.pt")
trainer.fit()
torch.save(snapshot(), f"{sys.argv[1]}/rank{rank}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_ends_with_identical_parameters(
    tiny_overrides, subprocess_env, tmp_path
):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    overrides = tiny_overrides(
        "name=ddp",
        "method.name=alignmixup_ae",
        "method.draws=per_rank",  # ranks may take different branches (clean / mixed) in a step
        "train.max_steps=4",
        "model.ae.embed_channels=16",
        "model.ae.decoder_width=16",
        "model.ae.decoder_min_width=8",
        "tracking.experiment=t_ddp",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
        str(tmp_path),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    first_failure = "\n".join(x for x in proc.stderr.splitlines() if "[rank0]" in x)
    assert proc.returncode == 0, (first_failure or proc.stderr)[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = torch.load(tmp_path / "initial0.pt")
    assert rank0.keys() == rank1.keys() == initial.keys()
    for key in rank0:  # parameters; BatchNorm running stats are per rank, as in any DDP run
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    # They trained (the classifier and the decoder moved), and only rank 0 wrote the model file.
    for key in ("classifier.weight", "decoder.net.0.0.weight", "stages.0.0.0.0.weight"):
        assert not torch.equal(rank0[key], initial[key]), key
    assert (tmp_path / "run" / FINAL_MODEL).is_file()
    # The run's tags name the world and the hosts of both ranks (one host here, named once).
    journal = (tmp_path / "run" / "tracking" / "journal.jsonl").read_text().splitlines()
    start = json.loads(journal[0])
    assert start["kind"] == "start"
    assert start["tags"]["pipeline.world_size"] == "2"
    assert start["tags"]["pipeline.hosts"] == socket.gethostname()


@pytest.mark.parametrize(("minutes", "steps"), [(None, [23, 46]), (1000.0, [46])])
def test_checkpoint_minutes_replaces_the_checkpoint_at_each_epochs_end(
    tiny_overrides, minutes, steps
):
    """Two epochs of 23 steps: a checkpoint at the first epoch's end by default; with
    train.checkpoint_minutes not yet elapsed, only the one at the end of the run."""
    recipe = load_recipe(
        None,
        tiny_overrides(
            "train.epochs=2",
            "data.batch_size=64",
            "optim.reference_batch=64",
            "train.checkpoint_every=1000",
            "train.keep_checkpoints=5",
            "tracking.enabled=false",
            f"train.checkpoint_minutes={'null' if minutes is None else minutes}",
        ),
    )
    Trainer(recipe).fit()
    found = [read_state(p).step for p in list_checkpoints(recipe.train.output_dir)]
    assert found == steps
