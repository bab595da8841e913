"""What tracking costs training, and what a server outage costs it.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_tracking.py throughput [--pairs 5]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_tracking.py outage [--minutes 10]

`throughput`: the demo baseline recipe (digits, DALI CPU, 3 epochs) in fresh processes, tracking
on (a SQLite store, system metrics every 10 s) and off (`tracking.enabled=false`), alternating;
the training loop's images/s (the runs' own `perf/images_per_s`, start-up excluded).

`outage`: a real `mlflow server` on 127.0.0.1; a run of timm's tiny test ResNet on the digits,
logging every step, long enough to outlast the outage; the server is killed one minute in and
started again `--minutes` later. Reported: steps per second before, during and after the outage
(from the journal's timestamps), whether the run finished, and how many of its logged steps and
epochs the server holds at the end (all of them, or the count lost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TINY = [
    "model.name=test_resnet", "model.output_stride=8", "model.channels_last=false",
    "data.backend=torchvision", "data.batch_size=16", "data.num_threads=1", "data.train_size=32",
    "data.val_resize=32", "data.val_crop=32", "data.color_jitter=0", "data.lighting=0",
    "data.flip=false", "data.max_val_samples=64", "optim.reference_batch=16", "train.amp=no",
    "train.cpu=true", "train.progress=false", "train.log_every=1",
]  # fmt: skip


def _train(overrides: list[str], **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "train", "--recipe", "recipes/demo/baseline.yaml"]
    return subprocess.Popen([*command, *overrides], cwd=REPO, text=True, **popen)


def _journal(run_dir: Path) -> list[dict]:
    from pipeline.runs.journal import read_entries

    return [e for _, e in read_entries(run_dir / "tracking" / "journal.jsonl")]


def throughput(pairs: int, root: Path) -> None:
    from pipeline.data.demo import build_digits_dataset

    digits = build_digits_dataset(root / "digits")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(pairs):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            out = root / f"{mode}{i}"
            overrides = [f"data.root={digits}", f"train.output_dir={out}", "train.epochs=3",
                         "train.progress=false", f"tracking.tracking_uri=sqlite:///{root}/m.db",
                         "tracking.experiment=bench", "tracking.system_metrics=true",
                         f"tracking.enabled={mode == 'on'}"]  # fmt: skip
            proc = _train(overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(err[-3000:])
            windows = [e["values"]["perf/images_per_s"] for e in _journal(out)
                       if "perf/images_per_s" in e.get("values", {})]  # fmt: skip
            rates[mode].append(statistics.median(windows))
            print(f"pair {i} tracking {mode}: {rates[mode][-1]:.0f} images/s", flush=True)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print("\n| tracking | images/s (median of runs) |\n|---|---:|")
    print(f"| on (SQLite, system metrics) | {on:.0f} |\n| off | {off:.0f} |")
    print(
        f"| **on / off** | **{on / off:.3f}**; median of the pairs' ratios "
        f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)}) |"
    )


def outage(minutes: float, root: Path) -> None:
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer

    from pipeline.data.demo import build_digits_dataset

    digits = build_digits_dataset(root / "digits")
    server = MlflowServer(root / "server").start()
    out = root / "run"
    try:
        # Long enough to go on past the outage: epochs of 90 steps, every step logged.
        overrides = [*TINY, f"data.root={digits}", f"train.output_dir={out}", "train.epochs=400",
                     f"train.max_steps={int((minutes + 3) * 60 * 40)}",
                     f"tracking.tracking_uri={server.uri}", "tracking.experiment=outage",
                     "tracking.flush_timeout=600", "tracking.system_metrics=true"]  # fmt: skip
        proc = _train(overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(60)
        server.stop()
        killed = time.time() * 1000
        time.sleep(minutes * 60)
        server.start()
        back = time.time() * 1000
        _, err = proc.communicate()
        finished = time.time() * 1000
    finally:
        server.stop()
    entries = _journal(out)
    steps = [(e["time"], e["step"]) for e in entries if "train/loss" in e.get("values", {})]
    epochs = {e["step"] for e in entries if "val/top1_err" in e.get("values", {})}

    def rate(start: float, end: float) -> float:
        """Steps per second while training ran within [start, end)."""
        inside = [(t, s) for t, s in steps if start <= t < end]
        if len(inside) < 2:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / ((inside[-1][0] - inside[0][0]) / 1000)

    first = steps[0][0]
    print(
        f"exit status {proc.returncode}; {len(steps)} steps logged, {len(epochs)} validations; "
        f"training ended {(steps[-1][0] - back) / 1000:+.0f} s after the server came back"
    )
    print("| phase | steps/s |\n|---|---:|")
    print(f"| before the outage | {rate(first, killed):.2f} |")
    print(f"| server down ({minutes:g} min) | {rate(killed, back):.2f} |")
    print(f"| after it is back | {rate(back, finished):.2f} |")
    server.start()
    try:
        client = MlflowClient(tracking_uri=server.uri)
        run = client.search_runs([client.get_experiment_by_name("outage").experiment_id])[0]
        held = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        held_val = {m.step for m in client.get_metric_history(run.info.run_id, "val/top1_err")}
    finally:
        server.stop()
    lost = {s for _, s in steps} - held
    print(
        f"server run {run.info.run_id} ({run.info.status}): {len(held)} of {len(steps)} steps, "
        f"{len(held_val)} of {len(epochs)} validations; lost steps: {len(lost)}"
    )
    print(json.dumps({"stderr_tail": err[-600:]}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", choices=["throughput", "outage"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "throughput":
            throughput(args.pairs, Path(tmp))
        else:
            outage(args.minutes, Path(tmp))


if __name__ == "__main__":
    main()
