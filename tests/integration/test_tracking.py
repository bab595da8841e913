"""Tracking that survives a real cluster, against real `mlflow server` processes on 127.0.0.1:
a server killed and restarted mid-run, a server down for a whole run, a required server that is
absent, no MLflow at all, and three runs logging at once to one store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, free_port

from pipeline.runs.journal import read_entries

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _train(overrides: list[str], env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml"]
    return subprocess.Popen(
        [*command, *overrides], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _output(overrides: list[str]) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir=")))


def _journal_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    path = run_dir / "tracking" / "journal.jsonl"
    return [e["step"] for _, e in read_entries(path) if key in e.get("values", {})]


def _delivered(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "tracking" / "sent.json").read_text())["offset"]
    except (OSError, ValueError, KeyError):
        return 0


def _server_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def _wait(condition, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_server_killed_mid_run_and_restarted(tiny_overrides, subprocess_env, tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        overrides = tiny_overrides(
            "name=outage",
            "train.max_steps=180",  # two epochs of 90 steps
            f"tracking.tracking_uri={server.uri}",
            "tracking.experiment=t_outage",
            "tracking.flush_timeout=300",
            output="outage",
        )
        run_dir = _output(overrides)
        proc = _train(overrides, subprocess_env)
        _wait(lambda: _delivered(run_dir) > 0, 240, "the first delivery", proc)
        server.stop()
        seen = len(_journal_steps(run_dir))
        _wait(lambda: len(_journal_steps(run_dir)) >= seen + 40, 240, "training on", proc)
        server.start()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "does not answer" in err and "answers again" in err
        client, run = _server_run(server.uri, "t_outage")
        assert run.info.status == "FINISHED"
        assert _steps(client, run.info.run_id, "train/loss") == list(range(1, 181))
        assert _steps(client, run.info.run_id, "val/top1_err") == [1, 2]
        assert run.data.params["method.name"] == "baseline"
    finally:
        server.stop()


def test_server_down_for_the_whole_run_then_synced(tiny_overrides, subprocess_env, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens here yet
    overrides = tiny_overrides(
        "name=down",
        "train.max_steps=12",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=t_down",
        "tracking.flush_timeout=2",
        output="down",
    )
    run_dir = _output(overrides)
    proc = _train(overrides, subprocess_env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("does not answer") == 1  # one line, not a traceback per call
    assert "Traceback" not in err and "sync-tracking" in err
    assert _journal_steps(run_dir) == list(range(1, 13))

    server = MlflowServer(tmp_path / "server", port=int(uri.rsplit(":", 1)[1])).start()
    try:
        # The same command again: the run is finished, and the journal goes now.
        again = subprocess.run(
            [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml",
             *overrides, "tracking.flush_timeout=120"],
            env=subprocess_env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        client, run = _server_run(uri, "t_down")
        assert run.info.status == "FINISHED"
        assert _steps(client, run.info.run_id, "train/loss") == list(range(1, 13))
        assert _steps(client, run.info.run_id, "val/top1_err") == [0]
        # sync-tracking finds nothing left, and names the run.
        sync = subprocess.run(
            [sys.executable, "-m", "pipeline", "sync-tracking", str(run_dir)],
            env=subprocess_env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (
            sync.returncode == 0
            and f"0 journal entries sent; MLflow run {run.info.run_id}" in sync.stdout
        )
    finally:
        server.stop()


def test_required_tracking_without_a_server_exits_2_naming_the_uri(tiny_overrides, subprocess_env):
    uri = f"http://127.0.0.1:{free_port()}"
    overrides = tiny_overrides(
        "train.max_steps=2", f"tracking.tracking_uri={uri}", "tracking.required=true"
    )
    proc = _train(overrides, subprocess_env)
    _, err = proc.communicate(timeout=180)  # the probe gives up after 30 s
    assert proc.returncode == 2, err[-3000:]
    assert f"tracking.required: MLflow at {uri} does not answer" in err
    assert "Traceback" not in err


DISABLED = """
import sys
from pathlib import Path
from pipeline.recipe import load_recipe
from pipeline.tools.compare import compare_folders
from pipeline.training import Trainer
summary = Trainer(load_recipe(None, sys.argv[1:])).fit()
assert summary.steps == 6, summary
files = compare_folders([Path(summary.output_dir)], Path(summary.output_dir) / "compare")
print(files["markdown"].read_text())
loaded = sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))
assert not loaded, loaded
print("no mlflow")
"""


def test_tracking_disabled_never_imports_mlflow_and_keeps_a_journal(
    tiny_overrides, subprocess_env, tmp_path
):
    overrides = tiny_overrides(
        "data.backend=dali",
        "train.max_steps=6",
        "tracking.enabled=false",
        "method.name=alignmixup",
        output="offline",
    )
    proc = subprocess.run(
        [sys.executable, "-c", DISABLED, *overrides],
        env=subprocess_env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "no mlflow" in proc.stdout, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| run ")]
    assert table and "| alignmixup " in proc.stdout  # compare read the journal
    run_dir = _output(overrides)
    assert _journal_steps(run_dir) == list(range(1, 7))
    assert _journal_steps(run_dir, "val/top1_err") == [0]
    assert (run_dir / "curves.png").is_file()
    assert not (run_dir / "tracking" / "sent.json").exists()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("shared_server")).start()
    yield server
    server.stop()


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_three_runs_logging_at_once_to_one_store(
    store, shared_server, tiny_overrides, subprocess_env, tmp_path
):
    uri = shared_server.uri if store == "server" else f"sqlite:///{tmp_path / 'shared.db'}"
    experiment = f"t_three_{store}"
    runs = [
        tiny_overrides(
            f"name=run{i}",
            "train.max_steps=30",
            f"tracking.tracking_uri={uri}",
            f"tracking.experiment={experiment}",
            "tracking.system_metrics=true",
            "tracking.system_metrics_interval=1",
            output=f"run{i}",
        )
        for i in range(3)
    ]
    procs = [_train(overrides, subprocess_env) for overrides in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(found) == ["run0", "run1", "run2"]
    for name, run in found.items():
        assert run.info.status == "FINISHED", name
        assert _steps(client, run.info.run_id, "train/loss") == list(range(1, 31)), name
        run_dir = _output(runs[int(name[-1])])
        assert _delivered(run_dir) == (run_dir / "tracking" / "journal.jsonl").stat().st_size
