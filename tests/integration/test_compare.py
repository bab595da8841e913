"""`compare` on a real SQLite MLflow store holding runs logged here with the trainer's names."""

from __future__ import annotations

import csv

import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.methods import method_names
from pipeline.tools import compare as compare_cmd
from pipeline.tools import compare_table
from pipeline.tools.method_order import METHOD_ORDER

EXPERIMENT = "cmp-test"

# name -> (params, final metrics, val/top1_err history); values chosen to survive no rounding.
RUNS = {
    "ae-run": (
        {"method.name": "alignmixup_ae", "model.name": "resnet18", "num_params": "15123456"},
        {
            "final/top1_err": 31.25,
            "final/best_top1_err": 30.5,
            "final/top5_err": 11.125,
            "perf/msec_per_batch": 688.0,
            "eval/ece": 0.0375,
            "eval/fgsm_err": 71.5,
            "eval/pgd_err": 88.25,
            "eval/ood/svhn/auroc": 0.875,
            "eval/ood/svhn/det_acc": 0.8125,
        },
        [52.0, 40.0, 31.25],
    ),
    "base-run": (
        {"method.name": "baseline", "model.name": "resnet18", "num_params": "11227812"},
        {"final/top1_err": 35.75, "final/best_top1_err": 35.0, "perf/msec_per_batch": 418.0},
        [60.0, 45.5, 35.75],
    ),
    "align-run": (
        {"method.name": "alignmixup", "model.name": "resnet18", "num_params": "11227812"},
        {
            "final/top1_err": 33.5,
            "final/best_top1_err": 33.0,
            "perf/msec_per_batch": 450.0,
            "wsol/top1_loc": 56.25,
            "wsol/maxboxacc_v2": 65.5,
        },
        [58.0, 41.0],
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with the three runs above; returns (uri, tmp folder)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    for name, (params, metrics, history) in RUNS.items():
        run_id = client.create_run(exp_id, run_name=name).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for epoch, value in enumerate(history):
            client.log_metric(run_id, "val/top1_err", value, step=epoch)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
    return uri, root


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cells(line: str) -> list[str]:
    """The stripped cells of one Markdown table line."""
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_numbers_equal_logged_metrics(store, tmp_path):
    uri, _ = store
    files = compare_cmd.compare(EXPERIMENT, tmp_path / "out", uri)
    rows = _read_csv(files["csv"])
    # paper order: baseline before alignmixup before alignmixup_ae
    assert [r["run"] for r in rows] == ["base-run", "align-run", "ae-run"]
    headers = {
        "final/top1_err": "top-1 err (%)",
        "final/best_top1_err": "best top-1 err (%)",
        "final/top5_err": "top-5 err (%)",
        "perf/msec_per_batch": "msec/batch",
        "eval/ece": "ECE (%)",
        "eval/fgsm_err": "FGSM err (%)",
        "eval/pgd_err": "PGD err (%)",
        "eval/ood/svhn/auroc": "OOD svhn AuROC (%)",
        "eval/ood/svhn/det_acc": "OOD svhn det acc (%)",
        "wsol/top1_loc": "Top-1 Loc (%)",
        "wsol/maxboxacc_v2": "MaxBoxAcc-v2 (%)",
    }
    for row in rows:
        params, metrics, _ = RUNS[row["run"]]
        assert row["method"] == params["method.name"]
        assert int(row["params"]) == int(params["num_params"])
        for key, header in headers.items():
            if key in metrics:
                assert float(row[header]) == metrics[key], (row["run"], key)
            else:
                assert row[header] == "", (row["run"], key)
    # OOD columns only for metrics some run logged
    assert "OOD svhn AuPR-in (%)" not in rows[0] and "GT-known Loc (%)" not in rows[0]

    markdown = files["markdown"].read_text().splitlines()
    header = ["run", "method", "model", "params", "msec/batch", "top-1 err (%)"]
    assert _cells(markdown[0])[:6] == header
    ae_line = next(line for line in markdown if _cells(line)[0] == "ae-run")
    assert _cells(ae_line)[:8] == [
        "ae-run",
        "alignmixup_ae",
        "resnet18",
        "15.12M",
        "688",
        "31.25",
        "30.5",
        "11.12",
    ]
    base_line = next(line for line in markdown if _cells(line)[0] == "base-run")
    assert "–" in _cells(base_line)  # metrics the baseline did not log


def test_rows_take_the_papers_method_order_and_other_methods_come_last_by_name():
    methods = ["zeta_mix", "alignmixup", "alpha_mix", "baseline", "alignmixup", "puzzlemix"]
    rows = [{"method": m, "run": i} for i, m in enumerate(methods)]
    ordered = [(r["method"], r["run"]) for r in compare_table.in_method_order(rows)]
    assert ordered == [
        ("baseline", 3),
        ("puzzlemix", 5),
        ("alignmixup", 1),  # within a method, the rows keep their order
        ("alignmixup", 4),
        ("alpha_mix", 2),
        ("zeta_mix", 0),
    ]
    assert set(METHOD_ORDER) <= set(method_names())  # no name there outlives its method


def test_plots_and_compare_run_are_reused(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _ = store
    for _ in range(2):
        files = compare_cmd.compare(EXPERIMENT, tmp_path / "out", uri)
    for kind in ("val_curves", "error_vs_time"):
        assert files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([exp.experiment_id])) == len(RUNS)  # the training runs only
    (compare_run,) = client.search_runs(
        [client.get_experiment_by_name(f"{EXPERIMENT}/compare").experiment_id]
    )
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id, "compare")}
    assert logged == {f"compare/{p.name}" for p in files.values()}
    # the compare run is not a row of its own table
    assert len(_read_csv(files["csv"])) == len(RUNS)


def test_missing_experiment_is_named(store, tmp_path):
    uri, _ = store
    with pytest.raises(PipelineError, match="'no-such-exp'"):
        compare_cmd.compare("no-such-exp", tmp_path / "out", uri)


def test_missing_store_is_not_created(tmp_path):
    db = tmp_path / "absent.db"
    with pytest.raises(PipelineError, match=r"'alignmixup'.*absent\.db"):
        compare_cmd.compare("alignmixup", tmp_path / "out", f"sqlite:///{db}")
    assert not db.exists()


def test_cli_prints_markdown_or_names_the_missing_experiment(store, tmp_path, capsys):
    uri, _ = store
    argv = ["compare", "--tracking-uri", uri, "--output-dir", str(tmp_path), "--no-mlflow"]
    assert main([*argv, "--experiment", EXPERIMENT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"MLflow store: {uri}"  # which store it read, first
    assert _cells(lines[1])[:2] == ["run", "method"]
    assert any(_cells(line)[:2] == ["align-run", "alignmixup"] for line in lines)
    assert main([*argv, "--experiment", "typo"]) == 2
    assert "experiment 'typo' not found" in capsys.readouterr().err
