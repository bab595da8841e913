"""Time one full training step per method, interleaved, on a synthetic batch already on the device.

Each method gets its own model (with the decoder for AlignMixup/AE), hook and SGD optimiser, as
the trainer would build them. After warm-up, every repetition runs one step of each method in
turn (round-robin), so clock drift, thermal throttling and other load hit all methods alike and
the ratios stay fair. Stochastic hooks (AlignMixup picks input or aligned mixing per batch, the
AE trains its decoder on 1/5 of the batches) draw from a seeded generator as in training, so
many steps reflect their real mix.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.config import Recipe
from pipeline.errors import PipelineError

ALIGNED_METHODS = ("alignmixup", "alignmixup_ae", "alignmixup_or_cutmix")
AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Settings:
    """What is measured and how; stored with every record so numbers stay interpretable."""

    methods: list[str]
    model: str
    size: int
    batch: int
    amp: str
    steps: int
    warmup: int
    channels_last: bool
    compile: bool
    device: str
    num_classes: int = 1000
    overrides: list[str] = field(default_factory=list)  # recipe `key=value`s, e.g. AE sizes
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)


@dataclass
class Bench:
    """One method's model, hook, optimiser and the step that trains it once."""

    method: str
    params: int
    step: Callable[[], None]
    hook: Any
    model: torch.nn.Module
    recipe: Recipe
    times_ms: list[float] = field(default_factory=list)


def recipe_for(method: str, s: Settings) -> Recipe:
    """The default recipe (plus overrides) for `method`, at the profiled settings."""
    from pipeline.config import load_recipe

    recipe = load_recipe(None, s.overrides)  # the fields below validate on assignment
    recipe.method.name = method
    recipe.model.name = s.model
    recipe.model.channels_last = s.channels_last
    recipe.model.compile = s.compile
    recipe.train.amp = s.amp
    recipe.train.seed = s.seed
    return recipe


def build_bench(method: str, s: Settings, images: torch.Tensor, labels: torch.Tensor) -> Bench:
    """Model, hook and optimiser for `method`, and a closure running one training step."""
    from pipeline.hooks import build_model_and_hook
    from pipeline.models import count_parameters
    from pipeline.training.optim import build_optimizer
    from pipeline.training.trainer import HookRunner

    recipe = recipe_for(method, s)
    device = images.device
    model, hook = build_model_and_hook(recipe, s.num_classes)
    params = count_parameters(model)
    model.to(
        device, memory_format=torch.channels_last if s.channels_last else torch.preserve_format
    )
    model.train()
    # The trainer's own wrapper (and its torch.compile), so the profiled step is the trained one.
    runner = HookRunner(model, hook)
    if s.compile:
        runner = torch.compile(runner)
    # A small lr keeps random-label training finite; it does not change the step's cost.
    optimizer = build_optimizer(recipe.optim, model, lr=1e-3)
    dtype = AMP_DTYPES[s.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")
    rng = torch.Generator().manual_seed(s.seed)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = runner(images, labels, rng)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return Bench(method, params, step, hook, model, recipe)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(bench: Bench, device: torch.device) -> float:
    """Wall milliseconds of one step, with the device idle before and drained after."""
    _sync(device)
    start = time.perf_counter()
    bench.step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _round_robin(benches: list[Bench], device: torch.device, reps: int, record: bool) -> None:
    for _ in range(reps):
        for bench in benches:
            elapsed = _timed(bench, device)
            if record:
                bench.times_ms.append(elapsed)


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def alignment_split(bench: Bench, images: torch.Tensor, s: Settings) -> dict[str, float]:
    """Median ms per call of the whole aligned mix and of its Sinkhorn solve alone.

    The hooks time `align` as one section; this splits it, on the same `A` (this model, train
    mode, under the step's autocast) and a partner batch rolled by one, so both numbers share
    their input and the Sinkhorn share of the alignment is meaningful.
    """
    from pipeline.mixing import align_mix, sinkhorn, squared_cost

    m = bench.recipe.method
    solver = {"mode": m.sinkhorn, "eps": m.sinkhorn_eps, "max_iter": m.sinkhorn_max_iter}
    dtype = AMP_DTYPES[s.amp]
    device = images.device
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        a = bench.model.features(images)
        partner = a.roll(1, dims=0)
        flat = a.flatten(2).transpose(1, 2)  # (B, r, c)
        flat_partner = partner.flatten(2).transpose(1, 2)
        reps = max(3, s.steps // 4)
        result = sinkhorn(squared_cost(flat, flat_partner), **solver)
        return {
            "align_mix_msec_per_call": _median_ms(
                lambda: align_mix(a, partner, 0.5, 0, **solver), device, reps
            ),
            "sinkhorn_msec_per_call": _median_ms(
                lambda: sinkhorn(squared_cost(flat, flat_partner), **solver), device, reps
            ),
            "sinkhorn_iterations": result.iterations,
        }


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (one value: itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _record(bench: Bench, s: Settings, baseline_ms: float | None, split: dict) -> dict:
    """One method's JSON record (see docs/profiling.md for the fields)."""
    q1, median, q3 = _quartiles(bench.times_ms)
    timer = bench.hook.timer
    per_step = {name: total / s.steps for name, total in sorted(timer.totals_ms.items())}
    per_call = {name: timer.totals_ms[name] / timer.counts[name] for name in sorted(timer.counts)}
    record = {
        "method": bench.method,
        "params": bench.params,
        "msec_per_batch": median,
        "msec_iqr": q3 - q1,
        "msec_q1": q1,
        "msec_q3": q3,
        "msec_mean": statistics.fmean(bench.times_ms),
        "msec_steps": list(bench.times_ms),  # every timed step, in order
        "images_per_s": s.batch / median * 1e3,
        "ratio_to_baseline": median / baseline_ms if baseline_ms else None,
        "hook_msec": sum(per_step.values()),
        "hook_sections_msec_per_step": per_step,
        "hook_sections_msec_per_call": per_call,
        "hook_section_calls": dict(sorted(timer.counts.items())),
        "device": s.device,
        "settings": asdict(s),
    }
    return record | split


def run_profile(s: Settings, log: Callable[[str], None] = print) -> list[dict]:
    """Measure every method in `s.methods` with `s.threads` CPU threads; one record per method."""
    previous = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _measure(s, log)
    finally:
        torch.set_num_threads(previous)


def _measure(s: Settings, log: Callable[[str], None]) -> list[dict]:
    from pipeline.config import METHODS

    unknown = [m for m in s.methods if m not in METHODS]
    if unknown or not s.methods:
        raise PipelineError(
            f"--methods: unknown {unknown or s.methods}; choose from {', '.join(METHODS)}"
        )
    torch.manual_seed(s.seed)
    device = torch.device(s.device)
    images = torch.randn(s.batch, 3, s.size, s.size, device=device)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, s.num_classes, (s.batch,), device=device)

    benches = []
    for method in s.methods:
        log(f"building {method} ({s.model}, {s.size} px, batch {s.batch}, {s.device})")
        benches.append(build_bench(method, s, images, labels))

    # A hook's sections synchronise the GPU, which would inflate the step times; there they are
    # measured in a pass of their own. On a CPU a sync is a no-op, so one pass serves both.
    separate_hook_pass = device.type == "cuda"
    log(f"warm-up: {s.warmup} step(s) per method")
    _round_robin(benches, device, s.warmup, record=False)
    for bench in benches:
        bench.hook.timer.enabled = not separate_hook_pass
    log(f"timing: {s.steps} step(s) per method, interleaved")
    _round_robin(benches, device, s.steps, record=True)
    if separate_hook_pass:
        for bench in benches:
            bench.hook.timer.enabled = True
        log(f"hook sections: {s.steps} more step(s) per method")
        _round_robin(benches, device, s.steps, record=False)

    baseline = next((b for b in benches if b.method == "baseline"), None)
    baseline_ms = statistics.median(baseline.times_ms) if baseline else None
    records = []
    for bench in benches:
        split = alignment_split(bench, images, s) if bench.method in ALIGNED_METHODS else {}
        records.append(_record(bench, s, baseline_ms, split))
    return records
