"""A run's tracking journal after what clusters do to files: a last line cut short by a crash, a
disk that fills up mid-write, a line that is not an entry; and `sync-tracking` delivering to
the store the run recorded, from another folder, with the shell's MLflow settings gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.runs.journal import Journal, read_entries, read_run
from pipeline.runs.tracking import NewRun, Tracker

EXPERIMENT = "t_journal_recovery"


def _line(**entry) -> bytes:
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode()


def _start(name: str, params: dict | None = None, **extra) -> bytes:
    return _line(
        kind="start", time=1000, name=name, experiment=EXPERIMENT, tags={},
        params=params or {"method.name": "baseline"}, recipe="name: x\n", **extra,
    )  # fmt: skip


def _metrics(step: int, loss: float) -> bytes:
    return _line(kind="metrics", time=1000 + step, step=step, values={"train/loss": loss})


def _run_folder(tmp_path: Path, name: str, *lines: bytes) -> Path:
    run = tmp_path / name
    (run / "tracking").mkdir(parents=True)
    (run / "tracking" / "journal.jsonl").write_bytes(b"".join(lines))
    return run


def _sync(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["sync-tracking", *args])
    out, err = capsys.readouterr()
    return status, out, err


def _loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)  # a point sent twice shows twice


def test_resume_after_a_torn_line_cuts_it_off_and_says_so(tmp_path, capsys):
    complete = _start("torn") + _metrics(1, 0.5)
    torn = b'{"kind":"metrics","time":1002,"step":2,"values":{"train/lo'
    run = _run_folder(tmp_path, "torn", complete + torn)
    path = run / "tracking" / "journal.jsonl"

    journal = Journal(run / "tracking")  # what a resume opens
    journal.append("resume")
    journal.append("metrics", step=2, values={"train/loss": 0.25})
    journal.close()

    lines = path.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:2]) == complete and len(lines) == 4
    assert [e["kind"] for _, e in read_entries(path)] == ["start", "metrics", "resume", "metrics"]
    assert read_run(run / "tracking").history == {"train/loss": [(1, 0.5), (2, 0.25)]}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(path) in err[0] and f"its {len(torn)} bytes dropped" in err[0]
    assert capsys.readouterr().err == ""  # nothing left to complain about

    # A journal that is one torn line and nothing else: nothing kept, a new run starts.
    only = _run_folder(tmp_path, "only_torn", torn)
    journal = Journal(only / "tracking")
    assert journal.empty()
    journal.close()
    assert f"its {len(torn)} bytes dropped" in capsys.readouterr().err


FULL_DISK = """
import resource, sys
from pathlib import Path
from pipeline.runs.journal import Journal

journal = Journal(Path(sys.argv[1]))
journal.append("start", name="full", params={})
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# The file may grow 10 more bytes: the next line is written in part (a short write, as on a disk
# that fills up midway), the one after not at all (EFBIG). Python ignores SIGXFSZ.
resource.setrlimit(resource.RLIMIT_FSIZE, (journal.path.stat().st_size + 10, hard))
journal.append("metrics", step=1, values={"train/loss": 1.0})
journal.append("metrics", step=2, values={"train/loss": 2.0})
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
journal.append("metrics", step=3, values={"train/loss": 3.0})
journal.close()
"""


def test_a_short_write_on_a_full_disk_leaves_no_torn_line(tmp_path, subprocess_env):
    folder = tmp_path / "full" / "tracking"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(folder)],
        env=subprocess_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = (folder / "journal.jsonl").read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") for line in lines)
    entries = [json.loads(line) for line in lines]  # each line whole: steps 1 and 2 are lost
    assert [(e["kind"], e.get("step")) for e in entries] == [("start", None), ("metrics", 3)]
    warnings = proc.stderr.splitlines()  # once, for the short write (and not again for EFBIG)
    assert len(warnings) == 1 and "cannot append (only 10 of" in warnings[0], proc.stderr


def test_bad_lines_are_named_skipped_and_the_rest_sent_once(
    tmp_path, capsys, mlflow_uri, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    glued = b'{"kind":"metrics","time":1002,"step":2,"val{"kind":"resume","time":2000}\n'
    run = _run_folder(
        tmp_path, "bad",
        _start("bad_lines", tracking_uri=mlflow_uri),  # line 1
        _metrics(1, 0.5),                               # 2
        glued,                                          # 3: a torn line with a resume on it
        b"[1, 2]\n",                                    # 4: JSON, not an entry
        _metrics(2, 0.25),                              # 5
        _line(kind="resume", time=3000),                # 6
        b'{"step": 3}\n',                               # 7: no kind, and the last line
    )  # fmt: skip
    path = run / "tracking" / "journal.jsonl"

    assert read_run(run / "tracking").history == {"train/loss": [(1, 0.5), (2, 0.25)]}
    said = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert said == [f"warning: tracking journal {path}:{n}: not an entry" for n in (3, 4, 7)]

    status, out, _ = _sync(capsys, str(run))
    assert status == 0 and " 4 journal entries sent;" in out  # start, two metrics, resume
    run_id = json.loads((run / "tracking" / "sent.json").read_text())["run_id"]
    assert _loss_history(mlflow_uri, run_id) == [(1, 0.5), (2, 0.25)]
    assert json.loads((run / "tracking" / "sent.json").read_text())["offset"] == path.stat().st_size

    journal = Journal(run / "tracking")
    assert journal.history("train/loss") == [(1, 0.5), (2, 0.25)]
    journal.append("metrics", step=3, values={"train/loss": 0.125})
    journal.append("status", status="FINISHED", reason=None)
    journal.close()
    status, out, _ = _sync(capsys, str(run))
    assert status == 0 and " 2 journal entries sent;" in out
    assert _loss_history(mlflow_uri, run_id) == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).info.status == "FINISHED"


def test_sync_delivers_to_the_store_the_run_recorded(tmp_path, capsys, mlflow_uri, monkeypatch):
    # Trained in one folder with $MLFLOW_TRACKING_URI set (MLflow was away: nothing delivered)...
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    recipe = load_recipe(None, ["tracking.enabled=false", f"tracking.experiment={EXPERIMENT}"])
    run = tmp_path / "recorded"
    tracker = Tracker(recipe.tracking, run, enabled=True)
    tracker.start(NewRun("t", recipe.flat(), ""))
    tracker.log({"train/loss": 0.75}, step=1)
    tracker.end("FINISHED")
    # ...synced from another folder, in a shell without it.
    (tmp_path / "login").mkdir()
    monkeypatch.chdir(tmp_path / "login")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    status, out, err = _sync(capsys, str(run))
    assert status == 0, err
    assert not (tmp_path / "login" / "mlflow.db").exists()
    run_id = json.loads((run / "tracking" / "sent.json").read_text())["run_id"]
    assert _loss_history(mlflow_uri, run_id) == [(1, 0.75)]
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(run_id).info.status == "FINISHED"
    assert out == f"{run}: 3 journal entries sent; MLflow run {run_id} at {mlflow_uri}\n"

    # Nothing set: the run records the default store, from the folder it started in.
    monkeypatch.chdir(tmp_path / "job")
    tracker = Tracker(recipe.tracking, tmp_path / "default", enabled=True)
    tracker.start(NewRun("t", recipe.flat(), ""))
    tracker.end("FINISHED")
    start = next(read_entries(tmp_path / "default" / "tracking" / "journal.jsonl"))[1]
    assert start["tracking_uri"] == f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}"


def test_sync_of_older_journals_and_the_override(tmp_path, capsys, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A journal from before runs recorded their store: the recipe's tracking.tracking_uri.
    older = _run_folder(
        tmp_path, "older", _start("older", {"tracking.tracking_uri": mlflow_uri}), _metrics(1, 1.5)
    )
    status, out, err = _sync(capsys, str(older))
    assert status == 0 and not (tmp_path / "mlflow.db").exists(), err
    run_id = json.loads((older / "tracking" / "sent.json").read_text())["run_id"]
    assert _loss_history(mlflow_uri, run_id) == [(1, 1.5)]
    assert out.endswith(f" at {mlflow_uri}\n")

    # --tracking-uri overrides what the run recorded; once delivered, another store is refused.
    never = f"sqlite:///{tmp_path / 'never.db'}"
    moved = _run_folder(tmp_path, "moved", _start("moved", tracking_uri=never), _metrics(1, 2.5))
    status, out, err = _sync(capsys, "--tracking-uri", mlflow_uri, str(moved))
    assert status == 0 and out.endswith(f" at {mlflow_uri}\n"), err
    run_id = json.loads((moved / "tracking" / "sent.json").read_text())["run_id"]
    assert _loss_history(mlflow_uri, run_id) == [(1, 2.5)]
    status, out, err = _sync(capsys, "--tracking-uri", never, str(moved))
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"tracked at {mlflow_uri}, not {never}" in err
    assert not (tmp_path / "never.db").exists()

    # Nothing recorded at all: as before, $MLFLOW_TRACKING_URI, and it says so.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    bare = _run_folder(tmp_path, "bare", _start("bare"), _metrics(1, 3.5))
    status, out, err = _sync(capsys, str(bare))
    assert status == 0 and out.endswith(f" at {mlflow_uri}\n")
    assert "records no tracking URI; sending to the $MLFLOW_TRACKING_URI store" in err
    assert mlflow_uri in err
