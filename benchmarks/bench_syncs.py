"""Host-device syncs in one training step of every method, and the Sinkhorn solver's time on a
GPU with and without host checks and under a CUDA graph (docs/profiling.md, docs/gpu.md).

Syncs: torch's sync debug mode warns at every operation that makes the host wait for the GPU;
each warning is traced to the first frame in this project (file:line) and counted per step.
Solver: `sinkhorn` on a (B, 49, 49) cost with train-mode magnitudes (≈ 1,400), 100 iterations,
median milliseconds per call: the eager loop host-checked and with its device-side exit
(`host_checks=False`), the fused Triton op (`backend="triton"`, the CUDA default), and the eager
loop captured once as a CUDA graph and replayed.

    PYTHONPATH=. python benchmarks/bench_syncs.py [--steps 3] [--batch 32] [--output F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.methods import method_names  # noqa: E402
from pipeline.tables import format_table  # noqa: E402
from pipeline.tools.method_order import ordered_methods  # noqa: E402


def _project_frame(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame in this repository's pipeline/ package, as file:line."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if REPO / "pipeline" in path.parents:
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "outside pipeline/"


def step_syncs(method_name: str, steps: int, batch: int) -> Counter:
    """{file:line: syncs per step} over `steps` bf16 channels-last train steps, after warm-up."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import MethodRunner, StepSettings, step_generator, train_step

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16")
    recipe = load_recipe(None, [f"method.name={method_name}", "model.name=resnet50"])
    method = build_method(recipe.method)
    model = method.build_model(recipe.model, 1000).to(memory_format=torch.channels_last)
    runner, optimizer = accelerator.prepare(
        MethodRunner(model, method), build_optimizer(recipe.optim, model, lr=1e-3)
    )
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    settings = StepSettings(channels_last=True)

    def run(step: int) -> None:
        train_step(accelerator, runner, optimizer, x, y, step_generator(0, step), settings)

    for s in range(2):  # warm-up: cuDNN autotuning and allocations are not the step's
        run(s)
    torch.cuda.synchronize()
    return _traced_syncs(run, steps)


def _traced_syncs(run, steps: int) -> Counter:
    """{file:line: syncs per step}: in sync debug mode "warn" torch warns at every sync; the
    warning is shown from inside the call that synced, so the stack names the project line."""
    found: Counter = Counter()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            found[_project_frame(traceback.extract_stack()[:-1])] += 1
        else:
            original(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            for s in range(steps):
                run(100 + s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Counter({k: v / steps for k, v in found.items()})


def _median_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def solver_times(batch: int = 128) -> dict[str, float]:
    """Median ms per `sinkhorn` call (authors' mode, 100 iterations) for each way it can run:
    the eager loop with and without host checks, the fused Triton op, and the eager loop
    captured once as a CUDA graph and replayed; and how far the fused plan is from the eager."""
    from pipeline.mixing import SinkhornOptions, sinkhorn, squared_cost

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.relu(torch.randn(batch, 49, 2048, device="cuda", generator=g) * 0.9)
    cost = squared_cost(a, a.roll(1, 0))
    ways = {
        "eager_host_checks_ms": lambda: sinkhorn(
            cost, SinkhornOptions(backend="eager", host_checks=True)
        ),
        "eager_device_exit_ms": lambda: sinkhorn(
            cost, SinkhornOptions(backend="eager", host_checks=False)
        ),
        "fused_triton_ms": lambda: sinkhorn(cost, SinkhornOptions(backend="triton")),
    }
    for way in ways.values():  # warm-up: Triton compiles, the allocator settles
        for _ in range(3):
            way()
    static = cost.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream before capture, as torch asks
        for _ in range(3):
            sinkhorn(static, SinkhornOptions(backend="eager", host_checks=False))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sinkhorn(static, SinkhornOptions(backend="eager", host_checks=False))
    graph.replay()
    torch.cuda.synchronize()
    eager = sinkhorn(cost, SinkhornOptions(backend="eager", host_checks=True)).plan
    fused = sinkhorn(cost, SinkhornOptions(backend="triton")).plan
    times = {name: _median_ms(way) for name, way in ways.items()}
    times["eager_cuda_graph_ms"] = _median_ms(graph.replay)
    times["fused_vs_eager_max_abs_diff_rel"] = float(
        (fused - eager).abs().max() / eager.abs().max()
    )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--methods", default=",".join(ordered_methods(method_names())))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_syncs.py needs a CUDA device: torch sees none")
    record: dict = {"device": torch.cuda.get_device_name(), "syncs": {}}
    rows = []
    for name in args.methods.split(","):
        found = step_syncs(name, args.steps, args.batch)
        record["syncs"][name] = dict(found)
        where = ", ".join(f"{k} ×{v:g}" for k, v in sorted(found.items())) or "none"
        rows.append([name, f"{sum(found.values()):g}", where])
    print(f"Host syncs per bf16 train step, {record['device']}, batch {args.batch}")
    print(format_table(["method", "syncs/step", "where (file:line × per step)"], rows))
    record["solver"] = solver_times()
    print("\nSinkhorn, authors' mode, B = 128, 49 × 49, 100 iterations (median ms per call):")
    print(format_table(["way", "ms"], [[k, f"{v:.3f}"] for k, v in record["solver"].items()]))
    if args.output:
        args.output.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
