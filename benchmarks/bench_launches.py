"""Ops one training step dispatches, per method, counted without a GPU (docs/profiling.md).

On a GPU each dispatched op that is not a view costs a kernel launch, 6–9 µs of host time; a
step that dispatches thousands of small ops is bound by them, not by the arithmetic. This counts
them on "meta" tensors (shapes only: no data, no device, no kernel): a TorchDispatchMode sees
every aten op of one `train_step` (forward, backward, optimiser) as a CUDA step issues it, with
the settings a CUDA run has:

- the ImageNet (ResNet-50, 224 px) and CIFAR-100 (PreAct ResNet-18, 32 px) recipes, batch 128,
  channels-last;
- SGD's `foreach` kernels (what torch picks for CUDA parameters); no gradient clipping (the AE
  recipes clip: on CUDA a handful of foreach ops, on "meta" one op per tensor, so it is left
  out of every count);
- the Sinkhorn solver as on CUDA: no host checks and the backend under test: `eager` (before:
  the per-iteration loop, all iterations queued) or `triton` (after: the fused solver, one op;
  on "meta" its shape function runs instead of its kernels).

What differs from a real CUDA step: "meta" has no autocast, so bf16's casts (about two per
convolution or linear layer, alike for every method) are not counted, and one aten op may be a
few cuDNN/cuBLAS kernels, also alike for every method. Random draws stay on the host, as in
training. Methods that compute on the host from the images (PuzzleMix's graph cut, SaliencyMix's
OpenCV map) cannot run on "meta" tensors and are listed as such.

    PYTHONPATH=. python benchmarks/bench_launches.py [--steps 8] [--output F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.tables import format_table  # noqa: E402

# Ops that allocate or re-describe memory without a kernel.
_NO_KERNEL = {"empty.memory_format", "empty_strided.default", "detach.default", "alias.default"}
SETTINGS = {  # (model, side, batch, classes, recipe folder)
    "resnet50": ("resnet50", 224, 128, 1000, "imagenet"),
    "preactresnet18": ("preactresnet18", 32, 128, 100, "cifar100"),
}
BACKENDS = ("eager", "triton")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it: all of them, and those that launch a kernel
    (not views, allocations or detaches)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(
            n
            for f, n in self.ops.items()
            if not f.is_view and f"{f._opname}.{f._overloadname}" not in _NO_KERNEL
        )


class _OneDevice:
    """What Accelerate does for `train_step` in one process with bf16, on "meta" tensors: no
    autocast (meta has none), a plain backward (bf16 needs no scaler), no DDP to silence."""

    def autocast(self):
        return contextlib.nullcontext()  # "meta" has no autocast (see the module docstring)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, _module):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


@dataclass
class StepCount:
    """Ops and kernel-launching ops per step, over the counted steps (mean and largest)."""

    ops_mean: float
    ops_max: int
    kernels_mean: float
    kernels_max: int


def count_steps(
    method: str, setting: str, backend: str, steps: int, extra: tuple[str, ...] = ()
) -> StepCount:
    """Count `steps` train steps (after one warm-up step, which creates the optimiser state)
    of `method` with the recipe of `setting`, on "meta" tensors."""
    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import MethodRunner, step_generator, train_step

    model_name, side, batch, classes, folder = SETTINGS[setting]
    path = REPO / "recipes" / folder / f"{method}.yaml"
    path = path if path.is_file() else None  # alignmixup_or_cutmix has no recipe of its own
    overrides = [f"method.name={method}", f"model.name={model_name}", "model.channels_last=true"]
    if hasattr(load_recipe(path, overrides).method, "sinkhorn_backend"):
        overrides += ["method.sinkhorn_host_checks=false", f"method.sinkhorn_backend={backend}"]
    recipe = load_recipe(path, [*overrides, *extra])
    device = _OneDevice()
    counts, kernels = [], []
    built = build_method(recipe.method)
    model = built.build_model(recipe.model, classes).to("meta", memory_format=torch.channels_last)
    runner = MethodRunner(model, built)
    optimizer = build_optimizer(recipe.optim, model, lr=0.1)
    for group in optimizer.param_groups:
        group["foreach"] = True  # torch's choice for CUDA parameters
    images = torch.empty(batch, 3, side, side, device="meta")
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.empty(batch, dtype=torch.int64, device="meta")
    for s in range(steps + 1):
        counter = OpCounter()
        with counter if s else contextlib.nullcontext():
            train_step(device, runner, optimizer, images, labels, step_generator(0, s))
        if s:
            counts.append(counter.total)
            kernels.append(counter.kernels)
    return StepCount(statistics.mean(counts), max(counts), statistics.mean(kernels), max(kernels))


def count_solve(backend: str, batch: int = 128, side: int = 49) -> tuple[int, int]:
    """(ops, kernel ops) of one `sinkhorn` call, authors' mode, on a (batch, side, side) cost."""
    from pipeline.mixing import SinkhornOptions, sinkhorn

    cost = torch.empty(batch, side, side, device="meta")
    counter = OpCounter()
    with counter:
        sinkhorn(cost, SinkhornOptions(mode="authors", host_checks=False, backend=backend))
    return counter.total, counter.kernels


# The aligned steps themselves: mixing at A on every batch (the recipes draw x, A or e, and the
# AE trains its decoder on a clean batch one step in five).
VARIANTS = {
    "alignmixup (A only)": ("alignmixup", ("method.mix_levels=[A]",)),
    "alignmixup_ae (A only)": ("alignmixup_ae", ("method.mix_levels=[A]", "method.clean_prob=0")),
}


def method_list() -> list[tuple[str, str, tuple[str, ...]]]:
    """(label, method, extra overrides) for every registered method and the aligned variant."""
    from pipeline.methods import method_names
    from pipeline.tools.method_order import ordered_methods

    rows = [(name, name, ()) for name in ordered_methods(method_names())]
    return rows + [(label, m, extra) for label, (m, extra) in VARIANTS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="counted steps per method")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", help="comma-separated labels (default: all)")
    parser.add_argument("--output", type=Path, help="write the counts as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    record: dict = {"solve": {}, "steps": {}}
    solve_rows = []
    for side in (49, 16):
        before, after = count_solve("eager", side=side), count_solve("triton", side=side)
        record["solve"][f"128x{side}x{side}"] = {"eager": before, "triton": after}
        solve_rows.append([f"B = 128, {side} × {side}", before[0], before[1], after[0], after[1]])
    print("Ops per Sinkhorn solve, authors' mode, no host checks (counted on meta tensors):")
    headers = ["cost", "eager ops", "eager kernels", "fused ops", "fused kernels"]
    print(format_table(headers, solve_rows) + "\n")
    wanted = set(args.methods.split(",")) if args.methods else None
    for setting in args.settings.split(","):
        model_name, side, batch, _, _ = SETTINGS[setting]
        rows, found = [], {}
        for label, method, extra in method_list():
            if wanted and label not in wanted:
                continue
            per_backend = {}
            for backend in BACKENDS:
                try:
                    per_backend[backend] = count_steps(method, setting, backend, args.steps, extra)
                except Exception as exc:  # host work on image values: not on meta tensors
                    per_backend[backend] = f"{type(exc).__name__}"
            found[label] = per_backend
        base = found.get("baseline", {}).get("triton")
        for label, per_backend in found.items():
            cells = [label]
            for backend in BACKENDS:
                c = per_backend[backend]
                if isinstance(c, StepCount):
                    known = isinstance(base, StepCount)
                    ratio = f"{c.ops_max / base.ops_max:.2f}" if known else "–"
                    cells += [f"{c.ops_mean:.0f} / {c.ops_max}", ratio]
                else:
                    cells += [f"n/a ({c})", "–"]
            rows.append(cells)
            record["steps"].setdefault(setting, {})[label] = {
                b: (vars(c) if isinstance(c, StepCount) else c) for b, c in per_backend.items()
            }
        print(
            f"Ops per train step, {model_name} channels-last, {side} px, batch {batch} "
            f"(counted on meta tensors; mean / largest over {args.steps} steps):"
        )
        headers = ["method", "before: eager solver", "× baseline", "after: fused", "× baseline"]
        print(format_table(headers, rows) + "\n")
    if args.output:
        args.output.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
