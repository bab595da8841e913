"""Fused-Sinkhorn cases run under Triton's interpreter, in a process of their own.

`TRITON_INTERPRET=1` must be set before Triton is first imported (its own library helpers are
made then), so `tests/unit/test_sinkhorn_triton.py` runs this module as
`TRITON_INTERPRET=1 python -m tests.triton_interpreter OUT` and compares what it saves (each
case's cost, options and fused result) with the eager solver in its own process.
"""

from __future__ import annotations

import sys

import torch

from pipeline.mixing import SinkhornOptions, sinkhorn, squared_cost

# The interpreter runs each program's iterations in Python (~7 ms an iteration), and the
# authors' first kernel always runs max_iter of them: cases keep B and max_iter small where
# the exit comes early anyway (every case here exits before 40 but the capped ones).
SHAPES = [(2, 1, 1), (2, 4, 4), (2, 16, 16), (2, 49, 49), (2, 64, 64), (2, 7, 12), (2, 49, 16),
          (1, 16, 16)]  # fmt: skip
SCALES = (0.5, 10.6, 1000.0)


def random_cost(batch: int, r: int, s: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Squared distances between random points in 8-D, times `scale`."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, r, 8, generator=gen), torch.rand(batch, s, 8, generator=gen)
    return squared_cost(a, b) * scale


def authors_23_cost() -> torch.Tensor:
    """The cost on which the authors' loop stops at iteration 23 (tests/unit/test_sinkhorn.py)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 9, 5, generator=gen), torch.rand(4, 9, 5, generator=gen)
    return ((a[:, :, None] - b[:, None]) ** 2).sum(-1) * 10.6


def resnet_costs() -> dict[str, torch.Tensor]:
    """Costs between last-stage features of 4 photo crops and their rolled partners, from an
    untrained ResNet-18 at 224 px in train mode (raw costs in the hundreds) and eval mode."""
    import timm

    from tests.photos import photo_batch

    torch.manual_seed(0)
    images = photo_batch(4)
    model = timm.create_model("resnet18", pretrained=False)
    costs = {}
    for name, train in (("train", True), ("eval", False)):
        model.train(train)
        with torch.no_grad():
            feats = model.forward_features(images).flatten(2).transpose(1, 2)  # (4, 49, 512)
        costs[name] = squared_cost(feats, feats.roll(1, 0))
    return costs


def cases() -> dict[str, tuple[torch.Tensor, dict]]:
    """name → (cost, sinkhorn keywords)."""
    out = {}
    for mode in ("authors", "converged"):
        short = {"mode": mode, "max_iter": 40}
        for shape in SHAPES:
            out[f"{mode}-{'x'.join(map(str, shape))}"] = (random_cost(*shape, 3.0), short)
        for scale in SCALES:  # the rule at once, mid-run, never (all 40 iterations)
            out[f"{mode}-scale{scale:g}"] = (random_cost(2, 9, 9, scale, seed=1), short)
        for phase, cost in resnet_costs().items():  # the solver's defaults: 100 / 1000
            out[f"{mode}-resnet-{phase}"] = (cost[:2], {"mode": mode})
    out["authors-23"] = (authors_23_cost(), {"mode": "authors", "max_iter": 30})  # exits at 23
    out["authors-23-capped"] = (authors_23_cost(), {"mode": "authors", "max_iter": 20})
    # solved alone, the first stops after 20 iterations and the second after 40
    easy_hard = torch.cat([random_cost(1, 8, 8, 1.0, seed=2), random_cost(1, 8, 8, 1.0, seed=11)])
    out["converged-easy-hard"] = (easy_hard, {"mode": "converged"})
    return out


def main(path: str) -> None:
    from pipeline.mixing import sinkhorn_triton

    assert sinkhorn_triton.interpreted(), "run with TRITON_INTERPRET=1"
    results = {}
    for name, (cost, options) in cases().items():
        fused = sinkhorn(cost, SinkhornOptions(backend="triton", **options))
        results[name] = (cost, options, fused.plan, fused.iterations, fused.marginal_error)
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
