"""The Slurm launchers against a real Slurm: two slurmd nodes on this machine, the real trainer.

The cluster (tests/slurm_cluster.py) is started once for the module and stopped at its end; jobs
run the per-recipe scripts exactly as `sbatch slurm/<recipe>.sh`, on the CPU, with tiny
overrides through EXTRA_OVERRIDES, on the digits JPEGs, logging to a SQLite MLflow store.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, ensure_installed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# slurm/launch.sh's settings: cleared so that the caller's environment cannot leak into a test.
SETTINGS = (
    "RECIPE",
    "PIPELINE_ROOT",
    "RUN_NAME",
    "OUTPUT_ROOT",
    "OUTPUT_DIR",
    "DATA_ROOT",
    "PRETRAINED",
    "EXTRA_OVERRIDES",
    "GPUS_PER_NODE",
    "MAIN_ADDR",
    "MAIN_PORT",
    "PYTHON",
    "CONTAINER_IMAGE",
    "CONTAINER_MOUNTS",
    "MLFLOW_TRACKING_URI",
    "MAX_LOST_REQUEUES",
)
JOB_TIMEOUT = 300.0  # seconds; only so that a broken job cannot hang the suite

# A 0.4M-parameter timm ResNet at 32 px on the CPU: a few steps take seconds.
TINY = [
    "model.name=test_resnet",
    "model.timm_kwargs={}",  # not the demo recipe's half-width channels
    "model.output_stride=8",
    "model.channels_last=false",
    "model.ae.embed_channels=16",
    "model.ae.decoder_width=32",
    "model.ae.decoder_min_width=8",
    "model.ae.decoder_blocks=1",
    "data.backend=torchvision",
    "data.batch_size=16",
    "data.num_threads=1",
    "data.train_size=32",
    "data.val_resize=32",
    "data.val_crop=32",
    "data.max_val_samples=32",
    "train.amp=no",
    "train.log_every=1",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why_not = ensure_installed()
    if why_not:
        pytest.skip(why_not)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("n1", "n2"), cpus=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def submit(cluster, digits_root, mlflow_uri, tmp_path):
    """Submit slurm/<script> from the repo root as a user would, with this test's settings;
    whatever the test leaves running is cancelled after it."""
    jobs: list[int] = []

    def run(script: str, *flags: str, overrides: list[str], experiment: str) -> int:
        env = clean_env(
            cluster,
            OUTPUT_ROOT=str(tmp_path / "runs"),
            DATA_ROOT=str(digits_root),
            MLFLOW_TRACKING_URI=mlflow_uri,
            EXTRA_OVERRIDES=" ".join([*TINY, f"tracking.experiment={experiment}", *overrides]),
            PYTHON=sys.executable,
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
        )
        job = cluster.sbatch(
            f"slurm/{script}",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={tmp_path}/slurm-%j.out",
            *flags,
            env=env,
            cwd=REPO,
        )
        jobs.append(job)
        return job

    yield run
    if jobs:
        cluster.run("scancel", *map(str, jobs), check=False)


def clean_env(cluster: SlurmCluster, **env: str) -> dict[str, str]:
    """The cluster's environment without launcher settings from outside, plus `env`."""
    return {**{k: v for k, v in cluster.env.items() if k not in SETTINGS}, **env}


def job_log(tmp_path: Path, job_id: int) -> str:
    return (tmp_path / f"slurm-{job_id}.out").read_text()


def only_run(mlflow_uri: str, experiment: str):
    """The one MLflow run of `experiment` (the test fails if there are more or none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment}, got {len(runs)}"
    return client, runs[0]


def logged_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(path: Path, cluster: SlurmCluster, job_id: int, log: Path) -> None:
    """Wait until `path` exists (the job is mid-run), failing early if the job ended."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not path.exists():
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} ended ({state}) before {path} appeared:\n{log.read_text()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_alignmixup_ae_job_completes_into_a_finished_mlflow_run(
    cluster, submit, mlflow_uri, tmp_path
):
    job = submit("imagenet_alignmixup_ae.sh", overrides=["train.max_steps=4"], experiment="e2e")
    info = cluster.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0"
    assert info["Restarts"] == "0"
    assert "launch.sh: run finished" in log

    client, run = only_run(mlflow_uri, "e2e")
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "alignmixup_ae"  # the recipe the script names
    assert run.data.params["train.cpu"] == "True"  # no GPUs on the node → CPU
    assert logged_steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    assert "val/top1_err" in run.data.metrics
    assert (tmp_path / "runs" / "imagenet_alignmixup_ae" / "model_final.safetensors").is_file()


@pytest.mark.parametrize(
    ("script", "nodes"),
    [("imagenet_baseline.sh", 1), ("imagenet_alignmixup.sh", 2)],
    ids=["one-process", "two-nodes"],
)
def test_usr1_checkpoints_requeues_and_resumes_into_the_same_run(
    cluster, submit, mlflow_uri, tmp_path, script, nodes
):
    """USR1 to the batch shell, as `--signal=B:USR1@...` sends before the time limit.

    The signal goes out once the step-4 checkpoint exists; `max_steps` leaves the run 20 steps
    (a second or more) to notice it, several times what the signal takes to arrive.
    """
    max_steps = 24
    experiment = f"preempt-{nodes}"
    job = submit(
        script,
        f"--nodes={nodes}",
        overrides=[
            f"train.max_steps={max_steps}",
            "train.checkpoint_every=4",
            "train.preempt_check_every=1",
            "data.batch_size=64",
        ],
        experiment=experiment,
    )
    run_dir = tmp_path / "runs" / script.removesuffix(".sh")
    checkpoint = run_dir / "checkpoints" / "step_00000004" / "trainer_state.json"
    wait_for(checkpoint, cluster, job, tmp_path / f"slurm-{job}.out")
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    info = cluster.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log  # requeued exactly once
    assert "launch.sh: got SIGUSR1" in log
    assert f"requeueing job {job}" in log
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert resumed, log
    step = int(resumed[0].split("step_")[1].split()[0])
    assert 4 <= step < max_steps  # it stopped mid-run, after the checkpoint we waited for
    assert not (run_dir / "PREEMPT").exists()

    client, run = only_run(mlflow_uri, experiment)  # one run across both job starts
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == str(nodes)
    # Every step logged once: the second start continued from the checkpoint, not step 0.
    assert logged_steps(client, run.info.run_id, "train/loss") == list(range(1, max_steps + 1))
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == max_steps and state["finished"]
    assert state["mlflow_run_id"] == run.info.run_id


def test_bad_override_fails_fast_and_is_not_requeued(cluster, submit, mlflow_uri, tmp_path):
    job = submit("imagenet_cutmix.sh", overrides=["train.bogus=1"], experiment="bad")
    info = cluster.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "FAILED", log
    assert info["ExitCode"] == "2:0"
    assert info["Restarts"] == "0"
    assert "unknown key 'train.bogus'" in log
    assert "not requeued" in log
    assert not (tmp_path / "runs" / "imagenet_cutmix" / "checkpoints").exists()
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_uri).get_experiment_by_name("bad") is None  # nothing trained


# A stand-in for the trainer (as PYTHON): it exits as a rank that lost a peer does under torchrun,
# status 1 with RANK_LOST left in the run folder, and says which start of the job it was.
LOST_RANK = """#!/bin/sh
for a in "$@"; do case $a in train.output_dir=*) out=${a#train.output_dir=} ;; esac; done
echo "start ${SLURM_RESTART_COUNT:-0}"
echo "rank 1: a collective with the other ranks failed (stand-in)" >"$out/RANK_LOST"
exit 1
"""


def test_a_lost_rank_is_requeued_until_the_limit_without_progress(cluster, tmp_path):
    fake = tmp_path / "lost-rank"
    fake.write_text(LOST_RANK)
    fake.chmod(0o755)
    env = clean_env(
        cluster, OUTPUT_ROOT=str(tmp_path / "runs"), PYTHON=str(fake), MAX_LOST_REQUEUES="1"
    )
    job = cluster.sbatch(
        "slurm/imagenet_baseline.sh", "--gpus-per-node=0", "--cpus-per-task=1",
        f"--output={tmp_path}/slurm-%j.out", env=env, cwd=REPO,
    )  # fmt: skip
    info = cluster.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, job)
    assert info["Restarts"] == "1", log  # requeued once, then the limit (1 in a row) holds
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "5:0", log
    assert "start 0" in log and "start 1" in log
    assert "a rank stopped answering (exit 1); requeueing" in log
    assert "1 time(s) in a row without a new checkpoint; not requeued" in log
    assert not (tmp_path / "runs" / "imagenet_baseline" / "RANK_LOST").exists()


# ------------------------------------------------------------ the command it builds
def print_command(cluster: SlurmCluster, script: str, **env: str) -> list[str]:
    """`slurm/<script> --print-command` with the given SLURM_* variables → srun's argv."""
    done = subprocess.run(
        ["bash", f"slurm/{script}", "--print-command"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=clean_env(cluster, **env),
        check=True,
    )
    return shlex.split(done.stdout)


def on_node(argv: list[str], node_id: int, tmp_path: Path) -> list[str]:
    """Run the per-node shell command of `argv` (after `bash -c`) as node `node_id` would, with
    PYTHON replaced by a program that prints its arguments; return what the node would run."""
    assert argv[-3:-1] == ["bash", "-c"]
    echo = tmp_path / "print-args"
    echo.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    echo.chmod(0o755)
    script = argv[-1].replace("python3", str(echo), 1)
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SLURM_NODEID": str(node_id)},
    )
    return done.stdout.splitlines()


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_two_nodes_of_four_gpus_build_one_accelerate_launch_per_node(cluster, tmp_path):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "32",
        "DATA_ROOT": "/data/imagenet",
        "PYTHON": "python3",
    }
    argv = print_command(cluster, "imagenet_alignmixup_ae.sh", **env)
    assert argv[0] == "srun"
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(argv)
    for node_id in (0, 1):
        args = on_node(argv, node_id, tmp_path)
        assert args[:3] == ["-m", "accelerate.commands.launch", "--multi_gpu"]
        assert flag(args, "--num_machines") == "2"
        assert flag(args, "--machine_rank") == str(node_id)  # evaluated on the node
        assert flag(args, "--num_processes") == "8"  # 2 nodes × 4 GPUs
        assert flag(args, "--main_process_ip") == "gpu07"  # the first node (unknown to Slurm)
        assert flag(args, "--main_process_port") == str(20000 + 4242)
        trainer = args[args.index("pipeline") - 1 :]
        assert trainer[:5] == [
            "-m",
            "pipeline",
            "train",
            "--recipe",
            "recipes/imagenet/alignmixup_ae.yaml",
        ]
        assert f"train.output_dir={REPO}/runs/imagenet_alignmixup_ae" in trainer
        assert {"train.resume=auto", "data.root=/data/imagenet"} <= set(trainer)
        assert "train.cpu=true" not in trainer


def test_main_address_is_the_first_nodes_slurm_address(cluster, tmp_path):
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_GPUS_PER_NODE": "a100:2",
        "PYTHON": "python3",
    }
    args = on_node(print_command(cluster, "imagenet_baseline.sh", **env), 1, tmp_path)
    assert flag(args, "--main_process_ip") == "127.0.0.1"  # n1's NodeAddr in slurm.conf
    assert flag(args, "--num_processes") == "4"  # a typed GPU request counts its number


def test_one_gpu_runs_the_trainer_without_a_launcher_in_a_container(cluster, tmp_path):
    env = {
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_ON_NODE": "1",
        "CONTAINER_IMAGE": "registry#alignmixup-pipeline:latest",
        "DATA_ROOT": "/data/CUB",
        "OUTPUT_ROOT": "/scratch/runs",
        "PRETRAINED": "/scratch/in1k/model_final.safetensors",
    }
    argv = print_command(cluster, "cub_wsol_alignmixup.sh", **env)
    assert "--container-image=registry#alignmixup-pipeline:latest" in argv
    folders = [str(REPO), "/scratch/runs", "/data/CUB", "/scratch/in1k"]
    mounts = ",".join(f"{f}:{f}" for f in folders)
    assert f"--container-mounts={mounts}" in argv
    assert f"--container-workdir={REPO}" in argv
    script = argv[-1]
    assert "accelerate" not in script
    node = shlex.split(script.split("exec", 1)[1])
    assert node[:6] == [
        "python",
        "-m",
        "pipeline",
        "train",
        "--recipe",
        "recipes/cub_wsol/alignmixup.yaml",
    ]
    assert {
        "model.pretrained=/scratch/in1k/model_final.safetensors",
        "data.root=/data/CUB",
        "train.output_dir=/scratch/runs/cub_wsol_alignmixup",
    } <= set(node)


def test_cub_scripts_default_to_the_imagenet_baseline_weights(cluster):
    argv = print_command(cluster, "cub_wsol_cutmix.sh", OUTPUT_ROOT="/scratch/runs")
    assert "model.pretrained=/scratch/runs/imagenet_baseline/model_final.safetensors" in argv[-1]
    assert "train.cpu=true" in argv[-1]  # no GPUs from Slurm: the CPU


def test_launcher_refuses_to_run_outside_a_job(cluster):
    done = subprocess.run(
        ["bash", "slurm/imagenet_baseline.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=clean_env(cluster),
    )
    assert done.returncode == 2
    assert "not inside a Slurm job" in done.stderr
