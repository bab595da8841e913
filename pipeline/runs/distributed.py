"""The collective the trainer and the checkpoint writer need besides DDP's own: "did any
rank…?", so that all ranks stop (or go on) together."""

from __future__ import annotations

import torch


def any_rank(accelerator, flags: torch.Tensor) -> torch.Tensor:
    """Elementwise: true where `flags` is true on at least one rank (one all-reduce MAX)."""
    merged = flags.to(accelerator.device, torch.float32)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(merged, op=torch.distributed.ReduceOp.MAX)
    return merged > 0
