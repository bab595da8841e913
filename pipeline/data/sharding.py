"""Which sample each rank reads at each step of an epoch, the same for both loader backends.

An epoch is a list of *slots*; slot `g` of the padded epoch order goes to rank `g % world_size`
(strided, like torch's DistributedSampler), and each rank cuts its slots into batches. Every
rank gets `steps * batch_size` slots, so all ranks run the same number of steps:

- train: the order is a permutation drawn from (seed, epoch); the tail is padded by wrapping
  around to the start of the permutation, so no sample is dropped and a few are seen twice.
  Each slot also carries a seed for its augmentation, drawn from (seed, epoch), so a sample's
  crop, flip and colour do not depend on the worker or thread that happens to process it.
- val: the order is the file order; padding slots repeat file 0 with label -1, which the
  metrics ignore, so every val sample is counted exactly once across ranks.

Written by hand because the plan must be shared by DALI and torchvision and must start at any
step of an epoch (mid-epoch resume); DistributedSampler gives neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PAD_LABEL = -1


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: per slot the file position, label and augmentation seed."""

    file_ids: np.ndarray  # int64, position in the SplitIndex
    labels: np.ndarray  # int64, PAD_LABEL on val padding
    seeds: np.ndarray  # uint32 (zeros for val)
    batch_size: int

    @property
    def steps(self) -> int:
        return len(self.file_ids) // self.batch_size

    def batches(self, start_step: int = 0):
        """Yield (file_ids, labels, seeds) per batch from `start_step` on."""
        b = self.batch_size
        for step in range(start_step, self.steps):
            sl = slice(step * b, (step + 1) * b)
            yield self.file_ids[sl], self.labels[sl], self.seeds[sl]


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Steps every rank runs so that all samples fit: ceil(N / (world_size · batch_size))."""
    return max(1, math.ceil(num_samples / (world_size * batch_size)))


def train_plan(
    labels: list[int] | np.ndarray,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
) -> RankPlan:
    """Shuffled, wrap-padded plan of one rank for one training epoch."""
    n = len(labels)
    total = steps_per_epoch(n, batch_size, world_size) * batch_size * world_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    order = np.resize(order, total)  # repeats the permutation from its start to fill `total`
    seeds = rng.integers(0, 2**32, size=total, dtype=np.uint64).astype(np.uint32)
    mine = slice(rank, total, world_size)
    labels = np.asarray(labels, dtype=np.int64)
    return RankPlan(order[mine], labels[order[mine]], seeds[mine], batch_size)


def val_plan(
    labels: list[int] | np.ndarray, batch_size: int, rank: int, world_size: int
) -> RankPlan:
    """In-order plan of one rank for validation; padding slots carry PAD_LABEL."""
    n = len(labels)
    total = steps_per_epoch(n, batch_size, world_size) * batch_size * world_size
    ids = np.arange(total, dtype=np.int64)
    lab = np.full(total, PAD_LABEL, dtype=np.int64)
    lab[:n] = np.asarray(labels, dtype=np.int64)
    ids[n:] = 0
    mine = slice(rank, total, world_size)
    return RankPlan(ids[mine], lab[mine], np.zeros(total // world_size, np.uint32), batch_size)
