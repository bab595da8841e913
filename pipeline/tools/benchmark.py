"""Time one full training step per method, interleaved, on a synthetic batch already on the device.

Each method gets its own model (with what the method needs, e.g. the AE's decoder) and optimiser,
built as the trainer builds them, and runs the trainer's own `train_step` under an Accelerator
of the profiled precision: the profiled step is the trained one. After warm-up, every
repetition runs one step of each method in turn (round-robin), so clock drift, thermal
throttling and other load hit all methods alike and the ratios stay fair. Stochastic methods
(AlignMixup picks input or aligned mixing per batch, the AE trains its decoder on 1/5 of the
batches) draw from per-step generators as in training, so many steps reflect their real mix.
The methods' own sections (their `<method>/<section>` profiler ranges) are read from a torch
profiler run over a pass of their own, so the profiler's cost stays out of the step times.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from pipeline.errors import PipelineError
from pipeline.methods import Method
from pipeline.methods.alignmixup import AlignSettings
from pipeline.recipe import Recipe


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
    """One method's model and optimiser, and the step that trains it once."""

    name: str
    params: int
    step: Callable[[], None]
    method: Method
    model: torch.nn.Module
    recipe: Recipe
    times_ms: list[float] = field(default_factory=list)


@dataclass
class SectionTimes:
    """One method's profiler ranges over a pass: per section, ms in all and calls."""

    msec: dict[str, float] = field(default_factory=dict)  # device time on a GPU, else CPU time
    host_msec: dict[str, float] = field(default_factory=dict)  # the host's time in the range
    calls: dict[str, int] = field(default_factory=dict)


def _applies(override: str, method: str) -> bool:
    """A `method.KEY=...` override applies to the methods whose settings have KEY; any other
    override to every method."""
    from pipeline.methods import settings_class

    key = override.split("=", 1)[0].strip().split(".")
    return key[0] != "method" or len(key) < 2 or key[1] in settings_class(method).model_fields


def recipe_for(method: str, s: Settings) -> Recipe:
    """The default recipe for `method` with the user's overrides that apply to it, then the
    profiled settings (which win, as the command's own options)."""
    from pipeline.recipe import load_recipe

    profiled = [
        f"model.name={s.model}",
        f"model.channels_last={s.channels_last}",
        f"model.compile={s.compile}",
        f"train.amp={s.amp}",
        f"train.seed={s.seed}",
    ]
    mine = [o for o in s.overrides if _applies(o, method)]
    return load_recipe(None, [f"method.name={method}", *mine, *profiled])


def check_settings(s: Settings) -> None:
    """Fail before any work: unknown or repeated methods (a method's profiler ranges carry its
    name), a `method.` override no profiled method has, or an override that does not validate
    (the error names the key)."""
    from pipeline.methods import method_names
    from pipeline.tools.method_order import ordered_methods

    known = ordered_methods(method_names())
    unknown = [m for m in s.methods if m not in known]
    if unknown or not s.methods:
        raise PipelineError(
            f"--methods: unknown {unknown or s.methods}; choose from {', '.join(known)}"
        )
    repeated = sorted({m for m in s.methods if s.methods.count(m) > 1})
    if repeated:
        raise PipelineError(f"--methods: {', '.join(repeated)} named more than once")
    for override in s.overrides:
        if not any(_applies(override, m) for m in s.methods):
            raise PipelineError(
                f"{override}: none of the profiled methods ({', '.join(s.methods)}) has "
                "that setting"
            )
    for method in s.methods:
        recipe_for(method, s)


def accelerator_for(s: Settings):
    """The Accelerator the trainer would use at this precision, on the profiled device."""
    from accelerate import Accelerator

    device = torch.device(s.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    try:
        return Accelerator(mixed_precision=s.amp, cpu=device.type == "cpu")
    except ValueError as exc:  # e.g. fp16 on a CPU, or a process already set to another amp
        raise PipelineError(f"--amp {s.amp} on {s.device}: {exc}") from None


def build_bench(
    accelerator, method: str, s: Settings, images: torch.Tensor, labels: torch.Tensor
) -> Bench:
    """Model and optimiser for `method`, and a closure running one `train_step`."""
    from pipeline.methods import build_method
    from pipeline.models import count_parameters
    from pipeline.training.build import method_context
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import MethodRunner, StepSettings, step_generator, train_step

    recipe = recipe_for(method, s)
    context = method_context(recipe, accelerator.process_index, s.num_classes)
    chosen = build_method(recipe.method, context)
    model = chosen.build_model(recipe.model, s.num_classes)
    params = count_parameters(model)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The trainer's own wrapper (and its compiled parts), so the profiled step is the trained one.
    runner = MethodRunner(model, chosen)
    if s.compile:
        model.compile_parts()
    # A small lr keeps random-label training finite; it does not change the step's cost.
    runner, optimizer = accelerator.prepare(runner, build_optimizer(recipe.optim, model, lr=1e-3))
    steps = itertools.count()

    def step() -> None:
        rng = step_generator(s.seed, next(steps))
        train_step(
            accelerator,
            runner,
            optimizer,
            images,
            labels,
            rng,
            StepSettings(recipe.optim.grad_clip, recipe.model.channels_last),
        )

    return Bench(method, params, step, chosen, model, recipe)


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


def section_times(
    benches: list[Bench], device: torch.device, steps: int
) -> dict[str, SectionTimes]:
    """Per method, its sections over `steps` more interleaved steps, from a torch profiler run
    filtered to the methods' `<method>/<section>` ranges (`Method.section`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as prof:
        _round_robin(benches, device, steps, record=False)
    times = {bench.name: SectionTimes() for bench in benches}
    for event in sorted(prof.key_averages(), key=lambda e: e.key):
        method, _, section = event.key.partition("/")
        if method not in times or not section or event.device_type != DeviceType.CPU:
            continue  # another op or range, or a range's copy on the GPU's timeline
        own = times[method]
        total_us = event.device_time_total if on_gpu else event.cpu_time_total
        own.msec[section] = total_us / 1e3
        own.host_msec[section] = event.cpu_time_total / 1e3
        own.calls[section] = event.count
    return times


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def alignment_split(
    accelerator, bench: Bench, images: torch.Tensor, s: Settings
) -> dict[str, float]:
    """Median ms per call of the whole aligned mix and of its Sinkhorn solve alone.

    The methods mark `align` as one section; this splits it, on the same `A` (this model, train
    mode, under the step's autocast) and a partner batch rolled by one, so both numbers share
    their input and the Sinkhorn share of the alignment is meaningful.
    """
    from pipeline.mixing import align_mix, sinkhorn, squared_cost

    solver = bench.recipe.method.solver()
    device = images.device
    with torch.no_grad(), accelerator.autocast():
        a = bench.model.features(images)
        partner = a.roll(1, dims=0)
        flat = a.flatten(2).transpose(1, 2)  # (B, r, c)
        flat_partner = partner.flatten(2).transpose(1, 2)
        reps = max(3, s.steps // 4)
        result = sinkhorn(squared_cost(flat, flat_partner), solver)
        return {
            "align_mix_msec_per_call": _median_ms(
                lambda: align_mix(a, partner, 0.5, 0, solver), device, reps
            ),
            "sinkhorn_msec_per_call": _median_ms(
                lambda: sinkhorn(squared_cost(flat, flat_partner), solver), device, reps
            ),
            "sinkhorn_iterations": int(result.iterations),
        }


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (one value: itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _record(
    bench: Bench, s: Settings, baseline_ms: float | None, sections: SectionTimes, split: dict
) -> dict:
    """One method's JSON record (see docs/profiling.md for the fields)."""
    q1, median, q3 = _quartiles(bench.times_ms)
    per_step = {name: total / s.steps for name, total in sections.msec.items()}
    per_call = {name: total / sections.calls[name] for name, total in sections.msec.items()}
    record = {
        "method": bench.name,
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
        "hook_section_calls": sections.calls,
        "hook_sections_host_msec_per_step": {
            name: total / s.steps for name, total in sections.host_msec.items()
        },
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
    check_settings(s)
    accelerator = accelerator_for(s)
    torch.manual_seed(s.seed)
    device = accelerator.device
    images = torch.randn(s.batch, 3, s.size, s.size, device=device)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, s.num_classes, (s.batch,), device=device)

    benches = []
    for method in s.methods:
        log(f"building {method} ({s.model}, {s.size} px, batch {s.batch}, {s.device})")
        benches.append(build_bench(accelerator, method, s, images, labels))

    log(f"warm-up: {s.warmup} step(s) per method")
    _round_robin(benches, device, s.warmup, record=False)
    log(f"timing: {s.steps} step(s) per method, interleaved")
    _round_robin(benches, device, s.steps, record=True)
    log(f"hook sections: {s.steps} more step(s) per method, under torch's profiler")
    sections = section_times(benches, device, s.steps)

    baseline = next((b for b in benches if b.name == "baseline"), None)
    baseline_ms = statistics.median(baseline.times_ms) if baseline else None
    records = []
    for bench in benches:
        aligns = isinstance(bench.recipe.method, AlignSettings)
        split = alignment_split(accelerator, bench, images, s) if aligns else {}
        records.append(_record(bench, s, baseline_ms, sections[bench.name], split))
    return records
