"""The collectives the trainer and the checkpoint writer need besides DDP's own: "did any
rank…?", so that all ranks stop (or go on) together, and "on which hosts?" for the run's tags."""

from __future__ import annotations

import socket

import torch


def any_rank(accelerator, flags: torch.Tensor) -> torch.Tensor:
    """Elementwise: true where `flags` is true on at least one rank (one all-reduce MAX)."""
    merged = flags.to(accelerator.device, torch.float32)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(merged, op=torch.distributed.ReduceOp.MAX)
    return merged > 0


def all_hosts(accelerator) -> list[str]:
    """The host names of all ranks, each once, sorted (every rank calls it: a collective)."""
    names = [socket.gethostname()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        names = gather_object(names)
    return sorted(set(names))
