"""The two collectives the loop needs besides DDP's own: "did any rank…?" and "rank 0 says…"."""

from __future__ import annotations

import torch


def any_rank(accelerator, flags: torch.Tensor) -> torch.Tensor:
    """Elementwise: true where `flags` is true on at least one rank (one all-reduce MAX)."""
    merged = flags.to(accelerator.device, torch.float32)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(merged, op=torch.distributed.ReduceOp.MAX)
    return merged > 0


def broadcast_str(accelerator, value: str | None) -> str | None:
    """The main rank's value on every rank (the MLflow run id is created there)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
