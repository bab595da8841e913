"""Images/s of the DALI and torchvision loaders on the same folder of ImageNet-sized JPEGs.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py [--images 400] [--epochs 4]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py --device cuda   # DALI "mixed"
    PYTHONPATH=. .venv/bin/python benchmarks/bench_loader.py --scale 22000 [--before DIR]

`--scale N` measures start-up and the training thread's feed cost on a tree of N files
instead (loader_scale.py says what and how).

The JPEGs are random crops of scikit-learn's two sample photos resized to 500×375 (ImageNet's
typical size) at quality 90. Both loaders run the recipe's train transform at 224 px with the
same number of threads/workers; the first epoch is warm-up and the median of the others is
reported. With `--device cuda` it also times a ResNet-50 bf16 training step (images/s the GPU
consumes), the number the loader has to beat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AUGMENTATIONS = {
    "crop+flip": {"color_jitter": 0.0, "lighting": 0.0},
    "authors (crop+flip+jitter+lighting)": {"color_jitter": 0.4, "lighting": 0.1},
}


def make_jpegs(root: Path, count: int, size=(500, 375), classes: int = 4) -> Path:
    """Write `count` JPEGs (ImageFolder layout, train and a small val) unless already there."""
    import numpy as np
    from PIL import Image

    marker = root / f".made_{count}_{size[0]}x{size[1]}"
    if marker.exists():
        return root
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
    except ImportError:  # a GPU machine without scikit-learn: smooth synthetic photos
        from tests.photos import synthetic_photo

        photos = [np.asarray(synthetic_photo(k, (640, 427))) for k in range(2)]
    rng = np.random.default_rng(0)
    for i in range(count):
        p = photos[i % 2]
        h, w = p.shape[:2]
        ch = int(rng.integers(h // 2, h + 1))
        cw = min(w, int(ch * size[0] / size[1]))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(p[y : y + ch, x : x + cw]).resize(size, Image.BILINEAR)
        for split in ("train", "val") if i < 2 * classes else ("train",):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"img{i:05d}.JPEG", quality=90)
    marker.touch()
    return root


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def time_epoch(loader, epoch: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one whole epoch, waiting for every batch."""
    loader.set_epoch(epoch)
    cpu0, start, seen = cpu_seconds(), time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    if images.is_cuda:
        import torch

        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    return seen / wall, seen / cpu


def train_step_rate(batch: int, steps: int = 20) -> float:
    """Images/s of a timm ResNet-50 bf16 SGD step on the GPU (channels-last), after warm-up."""
    import timm
    import torch

    model = (
        timm.create_model("resnet50", num_classes=1000).cuda().to(memory_format=torch.channels_last)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", default="/tmp/alignmixup_bench_jpegs", help="JPEG folder (made if absent)"
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4, help="including one warm-up epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for DALI 'mixed' decoding")
    parser.add_argument("--backends", default="dali,torchvision")
    scale = parser.add_argument_group("--scale mode (loader_scale.py)")
    scale.add_argument("--scale", type=int, help="files in a synthetic ImageNet-style tree")
    scale.add_argument("--tree", type=Path, help="where (default /tmp/alignmixup_tree_N)")
    scale.add_argument("--before", type=Path, help="another checkout to measure alongside")
    scale.add_argument("--ranks", type=int, default=2, help="1 skips the two-rank start")
    scale.add_argument("--steps", type=int, default=40, help="train batches timed for the feed")
    scale.add_argument("--repeats", type=int, default=3)
    scale.add_argument("--index-entries", type=int, help="also load an index this large")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.scale:
        from loader_scale import report

        tree = args.tree or Path(f"/tmp/alignmixup_tree_{args.scale}")
        report(
            args.scale, tree, args.before, args.ranks, args.steps, args.repeats, args.index_entries
        )
        return

    import torch

    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    root = make_jpegs(Path(args.data), args.images)
    print(
        f"{args.images} JPEGs 500x375 q90 in {root}; batch {args.batch}; "
        f"{args.threads} DALI threads / DataLoader workers; device {args.device}; "
        f"torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs"
    )
    print("| augmentation | backend | images/s (median) | per epoch | images per CPU-s (median) |")
    print("|---|---|---|---|---|")
    backends = args.backends.split(",")
    for aug_name, aug in AUGMENTATIONS.items():
        loaders = {}
        for backend in backends:
            cfg = DataConfig(
                backend=backend,
                root=str(root),
                batch_size=args.batch,
                num_threads=args.threads,
                **aug,
            )
            loaders[backend] = build_loaders(cfg, 0, 1, args.device, seed=0).train
        rates: dict[str, list[tuple[float, float]]] = {b: [] for b in backends}
        for epoch in range(args.epochs):
            # Alternate the order so both backends share any background load alike.
            for backend in backends if epoch % 2 == 0 else backends[::-1]:
                rates[backend].append(time_epoch(loaders[backend], epoch))
        wall, eff = {}, {}
        for backend in backends:
            kept = rates[backend][1:]  # epoch 0 is warm-up (workers, pipelines, caches)
            wall[backend] = statistics.median(r for r, _ in kept)
            eff[backend] = statistics.median(e for _, e in kept)
            shown = ", ".join(f"{r:.0f}" for r, _ in rates[backend])
            row = f"| {aug_name} | {backend} | {wall[backend]:.0f} | {shown} | {eff[backend]:.0f} |"
            print(row, flush=True)
        if {"dali", "torchvision"} <= wall.keys():
            r_wall = wall["dali"] / wall["torchvision"]
            r_eff = eff["dali"] / eff["torchvision"]
            print(
                f"| {aug_name} | **dali / torchvision** | **{r_wall:.2f}×** | | **{r_eff:.2f}×** |"
            )
        del loaders
    if args.device.startswith("cuda"):
        print(
            f"ResNet-50 bf16 train step consumes {train_step_rate(args.batch):.0f} images/s "
            f"at batch {args.batch}"
        )


if __name__ == "__main__":
    main()
