"""`make gpu-check`: everything only a CUDA machine can check or measure, in one report.

Runs with the machine's own Python and CUDA PyTorch (never reinstalled) and no network: the
packages it lacks from requirements-gpu.txt are installed from a wheel folder (`make wheelhouse`
elsewhere) into .gpu-site/ with pip --no-index --no-deps. Then, one part at a time, each in a
subprocess with its own time limit, and tracking off:

    tests    pytest -m gpu (tests/integration/test_gpu.py)
    syncs    host syncs per train step of every method; Sinkhorn eager / device-exit / CUDA graph
    align    benchmarks/bench_align.py --device cuda (pipeline vs the authors' approach)
    profile  python -m pipeline profile at its GPU defaults (ResNet-50, 224 px, batch 128, bf16)
    loader   benchmarks/bench_loader.py --device cuda (DALI mixed images/s vs the step's need)

It writes one Markdown report (device, driver, versions, every part's status, numbers and
output) to --report and commits nothing. Only the standard library is imported here.

    python3 benchmarks/gpu_check.py --wheels DIR --report DIR [--part tests,syncs] [--timeout 600]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / ".gpu-site"
PARTS = ("tests", "syncs", "align", "profile", "loader")


def requirements() -> list[tuple[str, str]]:
    """(distribution, pinned version) of requirements-gpu.txt."""
    pins = []
    for line in (REPO / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins.append((name, version))
    return pins


def installed(name: str) -> str | None:
    """The installed version of distribution `name` (system or .gpu-site), or None."""
    for path in (str(SITE), *sys.path):
        try:
            dists = importlib.metadata.distributions(name=name, path=[path])
            return next(iter(dists)).version
        except StopIteration:
            continue
    return None


def install(wheels: Path | None) -> tuple[bool, str]:
    """Install the missing pinned packages from `wheels` into .gpu-site; (ok, what happened)."""
    missing = [f"{n}=={v}" for n, v in requirements() if installed(n) is None]
    if not missing:
        return True, "every package of requirements-gpu.txt is already installed"
    if wheels is None:
        return False, f"missing and no WHEELS= folder given: {' '.join(missing)}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target"]
    cmd += [str(SITE), "--find-links", str(wheels), *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-2000:]
    return proc.returncode == 0, f"installed into {SITE}: {' '.join(missing)}\n{tail}"


def part_command(part: str, out: Path) -> list[str]:
    """The command line of one part; its JSON records go under `out`."""
    py = sys.executable
    return {
        "tests": [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/integration/test_gpu.py"],
        "syncs": [py, "benchmarks/bench_syncs.py", "--output", str(out / "syncs.json")],
        "align": [py, "benchmarks/bench_align.py", "--device", "cuda", "--output",
                  str(out / "align.json")],
        "profile": [py, "-m", "pipeline", "profile", "--device", "cuda", "--no-mlflow",
                    "--output", str(out / "profile.json")],
        "loader": [py, "benchmarks/bench_loader.py", "--device", "cuda", "--backends", "dali",
                   "--images", "2000", "--batch", "128", "--threads", "8"],
    }[part]  # fmt: skip


def run_part(part: str, out: Path, timeout: float) -> dict:
    """Run one part; its status, wall time and the tail of its output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_TRACKING_URI": "",  # nothing here logs to MLflow
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            part_command(part, out),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        status = "pass" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"FAIL (over {timeout:.0f} s)"
        output = exc.stdout or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
    counts = re.findall(r"\d+ (?:passed|failed|skipped|errors?)", output)
    if counts:  # pytest's summary: skips are not passes
        status += f" ({', '.join(counts)})"
    return {"part": part, "status": status, "wall_s": time.perf_counter() - start,
            "output": output[-6000:]}  # fmt: skip


def machine() -> dict[str, str]:
    """Device, driver and versions, read in a subprocess that sees .gpu-site."""
    probe = (
        "import json, platform, torch\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'cuda': str(torch.version.cuda), 'cudnn': str(torch.backends.cudnn.version()),\n"
        "        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}\n"
        "for m in ('timm', 'accelerate', 'torchmetrics', 'nvidia.dali', 'pydantic'):\n"
        "    try:\n"
        "        info[m] = __import__(m, fromlist=['x']).__version__\n"
        "    except Exception as exc:\n"
        "        info[m] = f'absent ({type(exc).__name__})'\n"
        "print(json.dumps(info))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"probe": proc.stderr[-500:]}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except FileNotFoundError:
        smi = ""
    info["nvidia-smi"] = smi or "not available"
    info["host"] = platform.node()
    return info


def report(path: Path, info: dict, setup: tuple[bool, str], results: list[dict]) -> Path:
    """The Markdown report: machine, set-up, a pass/fail table, then each part's output."""
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# gpu-check, {info.get('device', '?')}, {when}", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Set-up", "", "pass" if setup[0] else "FAIL", "", "```", setup[1], "```"]
    lines += ["", "## Parts", "", "| part | status | wall s |", "|---|---|---:|"]
    lines += [f"| {r['part']} | {r['status']} | {r['wall_s']:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r['part']}: {r['status']}", "", "```", r["output"].rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="wheel folder from `make wheelhouse`")
    parser.add_argument("--report", type=Path, default=REPO / "gpu-reports")
    parser.add_argument("--part", default="all", help=f"all, or some of {','.join(PARTS)}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per part")
    args = parser.parse_args()
    parts = PARTS if args.part == "all" else tuple(args.part.split(","))
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; parts are {', '.join(PARTS)}")
    wheels = args.wheels if args.wheels and str(args.wheels) else None
    setup = install(wheels)
    info = machine()
    if setup[0] and info.get("device", "none") == "none":
        setup = (False, f"{setup[1]}\ntorch sees no CUDA device: gpu-check is for a GPU machine")
    stamp = re.sub(r"[^0-9T]", "", datetime.datetime.now().isoformat(timespec="seconds"))
    out = args.report / f"gpu-check-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if setup[0]:
        for part in parts:
            print(f"gpu-check: {part} ...", flush=True)
            results.append(run_part(part, out, args.timeout))
            print(f"gpu-check: {part}: {results[-1]['status']}", flush=True)
    path = report(out / "report.md", info, setup, results)
    print(f"gpu-check: report {path}")
    ok = setup[0] and all(r["status"].startswith("pass") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
