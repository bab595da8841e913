"""How much bf16 autocast moves the AlignMixup plan: R on features from a float32 forward
against R on features from the same network under bf16 autocast (docs/mixing.md, Precision).

Untrained timm ResNet-50 in train mode (batch statistics, as when the plan is solved in
training) on 224 px crops of scikit-learn's two sample photos, each sample aligned with the
next. Four sets of features A, all from the same weights and images:

- float32: the reference, as the authors trained (float32 on V100s);
- bf16 autocast: what a `train.amp: bf16` run solves the plan on;
- bf16, last stage in float32: stages 1-3 under autocast, the last one outside it (the only
  way to have a float32 A under AMP: autocast's convolutions emit bf16);
- float32 A rounded to bf16: the rounding of A alone.

For each and each solver mode it prints A's relative distance to the float32 A and the largest
and mean |ΔR| against the float32 plan.

    PYTHONPATH=. python benchmarks/bench_align_precision.py [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.mixing import SinkhornOptions, align  # noqa: E402
from pipeline.models.backbone import MixNet  # noqa: E402
from pipeline.tables import format_table  # noqa: E402
from tests.photos import photo_batch  # noqa: E402


def features(model: MixNet, images: torch.Tensor, amp: bool, last_fp32: bool = False):
    """A from `model` in float32, under bf16 autocast, or under it with the last stage float32."""
    h = images
    device = images.device.type
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        for k in range(model.num_levels):
            if last_fp32 and k == model.num_levels - 1:
                with torch.autocast(device, enabled=False):
                    h = model.forward_levels(h.float(), k, k + 1)
            else:
                h = model.forward_levels(h, k, k + 1)
    return h.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MixNet("resnet50", 1000).to(args.device).train()
    images = photo_batch(args.batch).to(args.device)
    reference = features(model, images, amp=False)
    variants = {
        "bf16 autocast": features(model, images, amp=True),
        "bf16, last stage in float32": features(model, images, amp=True, last_fp32=True),
        "float32 A rounded to bf16": reference.bfloat16().float(),
    }
    perm = torch.roll(torch.arange(args.batch), 1).to(args.device)
    rows = []
    for mode in ("authors", "converged"):
        plan = align(reference, reference[perm], SinkhornOptions(mode=mode))
        for name, a in variants.items():
            moved = (align(a, a[perm], SinkhornOptions(mode=mode)) - plan).abs()
            rows.append(
                [
                    mode,
                    name,
                    f"{((a - reference).norm() / reference.norm()).item():.2e}",
                    f"{moved.max().item():.3g}",
                    f"{moved.mean().item():.2e}",
                ]
            )
    print(
        f"ResNet-50 (untrained, train mode), {args.batch} photo crops at 224 px, {args.device}, "
        f"torch {torch.__version__}"
    )
    print(format_table(["solver", "features", "‖ΔA‖/‖A‖", "max abs ΔR", "mean abs ΔR"], rows))


if __name__ == "__main__":
    main()
