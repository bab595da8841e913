"""What a CUDA training step would launch, checked without a GPU on "meta" tensors (shapes only:
any op that reads values, i.e. a host-device sync on a GPU, raises there): the fused Sinkhorn is
one op, an aligned step dispatches at most 1.15× the baseline's ops, and the in-memory loader
copies nothing from the host per step (benchmarks/bench_launches.py prints the whole table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_launches import OpCounter, count_solve, count_steps
from pipeline.config import DataConfig
from pipeline.data.memory import ArraySplit, MemoryLoader


def test_a_fused_solve_is_at_most_5_ops_where_the_eager_loop_queues_thousands():
    eager_ops, _ = count_solve("eager")
    fused_ops, fused_kernels = count_solve("triton")
    assert eager_ops > 4000  # 100 iterations of ~40 small ops
    assert fused_ops <= 5 and fused_kernels <= 1  # detach, and the one custom op


def test_an_aligned_resnet50_step_dispatches_at_most_115_percent_of_the_baseline():
    baseline = count_steps("baseline", "resnet50", "triton", steps=1)
    aligned = {
        backend: count_steps("alignmixup", "resnet50", backend, 1, ("method.mix_levels=[A]",))
        for backend in ("eager", "triton")
    }
    assert aligned["eager"].ops_max > 5 * baseline.ops_max  # before: the solver's loop
    assert aligned["triton"].ops_max <= 1.15 * baseline.ops_max


class HostToDevice(TorchDispatchMode):
    """Records each op that takes a CPU tensor and returns a tensor elsewhere: a host-to-device
    copy (on a GPU, a sync unless it is non-blocking from pinned memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        elsewhere = isinstance(out, torch.Tensor) and out.device.type != "cpu"
        if elsewhere and any(a.device.type == "cpu" and a.dim() > 0 for a in inputs):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("train", [True, False])
def test_the_in_memory_loader_copies_nothing_from_the_host_per_step(train):
    """The epoch's indices, labels and seeds reach the device once, before the first batch."""
    rng = np.random.default_rng(0)
    split = ArraySplit(
        rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, 10, 100).astype(np.int64),
        [str(i) for i in range(10)],
        "synthetic",
    )
    cfg = DataConfig(layout="cifar10", batch_size=16, train_size=32, val_resize=32, val_crop=32,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
    loader = MemoryLoader(split, cfg, train=train, batch_size=16, rank=0, world_size=1, seed=0,
                          device=torch.device("meta"))  # fmt: skip
    batches = iter(loader)
    first = HostToDevice()
    with first:
        images, labels = next(batches)
    assert 2 <= len(first.copies) <= 3  # ids, labels (and seeds): the whole epoch at once
    later = HostToDevice()
    with later:
        rest = list(batches)
    assert later.copies == []
    assert len(rest) == len(loader) - 1 and images.shape == (16, 3, 32, 32)
    assert images.device.type == labels.device.type == "meta"


def test_the_counter_sees_what_a_step_dispatches():
    """OpCounter against a hand-counted sequence: its counts are what the tests above rely on."""
    a = torch.empty(4, 4, device="meta")
    counter = OpCounter()
    with counter:
        b = (a + 1).t()  # add, t (a view)
        b.mul_(2)  # mul_
    assert counter.total == 3 and counter.kernels == 2
