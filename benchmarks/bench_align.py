"""Benchmark: pipeline.mixing.align_mix against the AlignMixup authors' approach.

The authors' approach, written out here: the cost as a broadcast (B, r, r, c) tensor and a
Sinkhorn loop that reads the error on the host (`.item()`) every iteration. Both run the
authors' mode (eps = 0.1, at most 100 iterations) on features with realistic magnitudes
(ReLU of a Gaussian: mean cost ≈ 1,400, like an untrained ResNet-50 in train mode), so both
run the same number of iterations. Each (implementation, batch size) runs in a fresh
subprocess. Peak memory is that of the first call over what was in use before it: on CPU
the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set
before the call; on CUDA torch.cuda.max_memory_allocated over memory_allocated. Times are
medians over `--repeats` further calls: wall time and the process's CPU time (the latter
is steadier on a shared machine).

    PYTHONPATH=. python benchmarks/bench_align.py [--device cuda] [--threads N] [--output F.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.mixing import SinkhornOptions, align_mix, sinkhorn, squared_cost  # noqa: E402
from tests.authors_reference import authors_sinkhorn  # noqa: E402

IMPLEMENTATIONS = ("authors", "pipeline")


def authors_align_mix(
    a: torch.Tensor, a_partner: torch.Tensor, lam: float, direction: int
) -> tuple[torch.Tensor, int]:
    """The authors' approach: broadcast cost, per-iteration host sync; returns (out, iterations)."""
    batch, c = a.shape[:2]
    eps, max_iter = 0.1, 100
    x = a.view(batch, c, -1).permute(0, 2, 1)
    y = a_partner.view(batch, c, -1).permute(0, 2, 1)
    with torch.no_grad():
        cost = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)  # via (B, r, r, c)
        plan, iterations = authors_sinkhorn(cost, eps, max_iter)
        assignment = plan * cost.shape[1]
    feats, partner = a.view(batch, c, -1), a_partner.view(batch, c, -1)
    if direction == 0:
        out = feats * lam + torch.matmul(partner, assignment.permute(0, 2, 1)) * (1 - lam)
    else:
        out = torch.matmul(feats, assignment) * lam + partner * (1 - lam)
    return out.view(a.shape), iterations


def make_features(
    batch: int, channels: int, side: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU-Gaussian features (mean squared distance ≈ 0.68·c) and their rolled partners."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, channels, side, side, generator=gen).relu_().to(device)
    return a, a.roll(1, 0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak_rss() -> int:
    """Reset this process's peak resident set (Linux clear_refs "5"); return the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    """Peak resident set since the last reset, in bytes."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one(impl: str, batch: int, channels: int, side: int, repeats: int, device: str) -> dict:
    """Time and measure one configuration in this process (called in a fresh subprocess)."""
    a, a_partner = make_features(batch, channels, side, device)
    cost = squared_cost(a.flatten(2).transpose(1, 2), a_partner.flatten(2).transpose(1, 2))
    mean_cost = cost.mean().item()
    if impl == "pipeline":
        iterations = sinkhorn(cost, SinkhornOptions(mode="authors")).iterations

        def step() -> torch.Tensor:
            return align_mix(a, a_partner, 0.3, 0, SinkhornOptions(mode="authors"))

    else:
        iterations = 0

        def step() -> torch.Tensor:
            nonlocal iterations
            out, iterations = authors_align_mix(a, a_partner, 0.3, 0)
            return out

    del cost
    _sync(device)
    # Peak memory of the first call, before anything else can raise the high-water mark.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _reset_peak_rss()
        out = step()
        peak = _peak_rss() - before
    del out
    times, cpu_times = [], []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "impl": impl,
        "batch": batch,
        "iterations": iterations,
        "median_s": statistics.median(times),
        "times_s": times,
        "cpu_median_s": statistics.median(cpu_times),
        "cpu_times_s": cpu_times,
        "peak_mib": peak / 2**20,
        "mean_cost": mean_cost,
    }


def agreement(channels: int, side: int, device: str) -> float:
    """Largest |pipeline − authors| over max |authors| on a batch of 8 (same plan rule)."""
    a, a_partner = make_features(8, channels, side, device)
    expected, _ = authors_align_mix(a, a_partner, 0.3, 0)
    got = align_mix(a, a_partner, 0.3, 0, SinkhornOptions(mode="authors"))
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--side", type=int, default=7, help="h = w; r = side²")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        impl, batch = args.worker[0], int(args.worker[1])
        print(json.dumps(run_one(impl, batch, args.channels, args.side, args.repeats, args.device)))
        return

    common = ["--device", args.device, "--channels", str(args.channels), "--side", str(args.side)]
    common += ["--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())]
    results = []
    for batch in args.batch_sizes:
        for impl in IMPLEMENTATIONS:
            cmd = [sys.executable, __file__, *common, "--worker", impl, str(batch)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"B={batch} {impl}: {results[-1]['median_s']:.3f} s", file=sys.stderr)
    rel_diff = agreement(args.channels, args.side, args.device)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    machine = (
        f"{device_name}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {datetime.date.today().isoformat()}"
    )
    r = args.side**2
    lines = [
        f"c = {args.channels}, r = {r}, authors' mode (eps 0.1, ≤ 100 iterations), "
        f"device {args.device}; {machine}",
        "",
        "| B | implementation | Sinkhorn iterations | median time (s) | median CPU time (s) "
        "| peak memory (MiB) | speed-up (time / CPU) | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch_sizes:
        rows = {row["impl"]: row for row in results if row["batch"] == batch}
        base = rows["authors"]
        for impl in IMPLEMENTATIONS:
            row = rows[impl]
            speed = base["median_s"] / row["median_s"]
            cpu_speed = base["cpu_median_s"] / row["cpu_median_s"]
            memory = base["peak_mib"] / max(row["peak_mib"], 1e-9)
            lines.append(
                f"| {batch} | {impl} | {row['iterations']} | {row['median_s']:.3f} | "
                f"{row['cpu_median_s']:.3f} | {row['peak_mib']:.0f} | "
                f"{speed:.1f}× / {cpu_speed:.1f}× | {memory:.1f}× |"
            )
    lines += [
        "",
        f"Mean cost {results[0]['mean_cost']:.0f}; "
        f"outputs agree to {rel_diff:.1e} (relative, B = 8).",
    ]
    print("\n".join(lines))
    if args.output:
        args.output.write_text(
            json.dumps(
                {"machine": machine, "relative_difference": rel_diff, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
