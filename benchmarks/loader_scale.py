"""`bench_loader.py --scale N`: the data path at ImageNet scale, before and after, in one run.

On a synthetic ImageNet-style tree of N JPEGs (100 classes, one file in 11 in val; 64 distinct
500×375 quality-90 photos crops written over and over, so the tree is made in seconds) it
measures, each in a fresh process so that nothing is cached in Python:

- start-up: `build_loaders` on one rank with a cold page cache (the first start) and warm (the
  next start, with the index when the code has one); with `--ranks 2` also two gloo ranks
  starting at once on a cold cache, each timing its own `build_loaders` (the slower counts);
- the feed: the CPU time of the training thread (`time.thread_time`) per sample while it
  iterates the DALI CPU train loader at 64 px, batch 128, and the loader's images/s;
- with `--index-entries M`: the load of an index of M synthetic entries (1,000 class folders).

`--before DIR` runs the same measurements on another checkout (e.g. a `git worktree` of the
commit before) in the same session, alternating with this one, so the ratios share the load.
Cold-cache numbers need root (`/proc/sys/vm/drop_caches`); without it they say "warm".
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 100
FEED = {"batch_size": 128, "train_size": 64, "val_resize": 64, "val_crop": 64}


def make_tree(root: Path, count: int) -> Path:
    """`count` JPEGs as ROOT/{train,val}/<class>/*.JPEG (10 train : 1 val), unless made."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    marker = root / f".made_{count}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    photos, pool = load_sample_images().images, []
    for i in range(64):
        p = photos[i % 2]
        h, w = p.shape[:2]
        ch = int(rng.integers(h // 2, h + 1))
        cw = min(w, int(ch * 500 / 375))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        buf = io.BytesIO()
        crop = Image.fromarray(p[y : y + ch, x : x + cw]).resize((500, 375), Image.BILINEAR)
        crop.save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    per_class = count // CLASSES
    k = 0
    for split, n in (("train", per_class - per_class // 11), ("val", per_class // 11)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                (folder / f"img_{c}_{j:06d}.JPEG").write_bytes(pool[k % 64])
                k += 1
    # Aged by a minute, so that an index built right away is trusted by the next start.
    old = time.time() - 60
    for folder in [root, *root.iterdir(), *root.glob("*/*")]:
        if folder.is_dir():
            os.utime(folder, (old, old))
    marker.touch()
    return root


def drop_caches() -> bool:
    """Empty the page cache (root only); True when it was done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _config(root: str, **extra):
    """A DataConfig for `root`, with the extra fields this checkout knows."""
    from pipeline.config import DataConfig

    known = {k: v for k, v in extra.items() if k in DataConfig.model_fields}
    return DataConfig(root=root, num_threads=2, color_jitter=0.0, lighting=0.1, **known)


def measure(kind: str, root: str, steps: int) -> dict:
    """One measurement in this process (the code under test is whatever `pipeline` imports)."""
    import warnings

    warnings.simplefilter("ignore")
    # What any training process has imported before it builds loaders: not part of the start.
    import nvidia.dali  # noqa: F401
    import torch.distributed  # noqa: F401
    import torchvision  # noqa: F401
    from PIL import Image  # noqa: F401

    from pipeline.data import build_loaders

    if kind == "startup":
        started = time.perf_counter()
        loaders = build_loaders(_config(root), 0, 1, "cpu", seed=0)
        seconds = time.perf_counter() - started
        files = len(loaders.train_index) + len(loaders.val_index)
        return {"seconds": seconds, "files": files}
    if kind == "ranks":
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(
            "gloo", init_method=os.environ["BENCH_STORE"], rank=rank, world_size=world
        )
        dist.barrier()
        started = time.perf_counter()
        build_loaders(_config(root), dist.get_rank(), dist.get_world_size(), "cpu", seed=0)
        seconds = time.perf_counter() - started
        times = [None] * dist.get_world_size()
        dist.all_gather_object(times, seconds)
        dist.destroy_process_group()
        return {"seconds": max(times), "per_rank": times}
    if kind == "feed":
        loader = build_loaders(_config(root, **FEED), 0, 1, "cpu", seed=0).train
        batches = iter(loader)
        for _ in range(3):  # pipeline start-up, worker warm-up
            next(batches)
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            next(batches)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        n = steps * FEED["batch_size"]
        return {"thread_us_per_sample": 1e6 * cpu / n, "images_per_s": n / wall}
    raise ValueError(kind)


def _run(checkout: Path, *args: str, env: dict | None = None) -> dict:
    """`measure` in a fresh process importing `pipeline` from `checkout`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", *args]
    full_env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run(command, env=full_env, capture_output=True, text=True, cwd=checkout)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {args} in {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ranks(checkout: Path, root: str) -> dict:
    """Two gloo ranks started at once, each timing its own build_loaders."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BENCH_STORE": f"file://{tmp}/store", "WORLD_SIZE": "2"}
        command = [sys.executable, str(Path(__file__).resolve()), "--measure", "ranks", root, "0"]
        procs = [
            subprocess.Popen(
                command,
                env={
                    **os.environ,
                    "PYTHONPATH": str(checkout),
                    "OMP_NUM_THREADS": "1",
                    **env,
                    "RANK": str(r),
                },
                cwd=checkout,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        outs = [p.communicate(timeout=3600) for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"ranks in {checkout} failed:\n{outs[0][1][-3000:]}")
        return json.loads(outs[0][0].strip().splitlines()[-1])


def index_load(entries: int) -> dict:
    """Seconds to load and verify an index of `entries` synthetic files in 1,000 folders."""
    import numpy as np
    import torch.distributed  # noqa: F401  (imported by any trainer before its loaders)

    from pipeline.data.image_checks import CheckedSplit
    from pipeline.data.index import indexed_split, save_index
    from pipeline.data.layouts import SplitIndex

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = [root / "train" / f"n{c:08d}" for c in range(1000)]
        for f in folders:
            f.mkdir(parents=True)
        files = [str(folders[i % 1000] / f"n{i % 1000:08d}_{i}.JPEG") for i in range(entries)]
        labels = [i % 1000 for i in range(entries)]
        names = [f.name for f in folders]
        sources = {str(p): p.stat().st_mtime_ns for p in [root / "train", *folders]}
        index = SplitIndex(files, labels, names, sources=sources)
        checked = CheckedSplit(index, np.full((entries, 2), 500, np.int32))
        cfg = _config(str(root))
        path = save_index(
            cfg, "train", None, index, checked, scan_started_ns=time.time_ns() + 10**10
        )
        started = time.perf_counter()
        found = indexed_split(cfg, "train")
        seconds = time.perf_counter() - started
        assert not found.built and len(found.split.index) == entries
        return {"seconds": seconds, "entries": entries, "mib": path.stat().st_size / 2**20}


def report(
    count: int,
    tree: Path,
    before: Path | None,
    ranks: int,
    steps: int,
    repeats: int,
    index_entries: int | None,
) -> None:
    """Print the scale table: before and after, side by side."""
    root = str(make_tree(tree, count))
    checkouts = [("after", REPO)] + ([("before", before)] if before else [])
    results: dict[str, dict[str, list]] = {name: {} for name, _ in checkouts}
    cold = None
    for rep in range(repeats):
        for name, checkout in checkouts if rep % 2 == 0 else checkouts[::-1]:
            index = tree / ".pipeline_index"
            if index.exists():
                for f in index.iterdir():
                    f.unlink()
            cold = drop_caches()
            rows = results[name]
            rows.setdefault("first start", []).append(_run(checkout, "startup", root))
            rows.setdefault("next start", []).append(_run(checkout, "startup", root))
            if ranks > 1:
                for f in index.iterdir() if index.exists() else []:
                    f.unlink()
                drop_caches()
                rows.setdefault("2 ranks at once, first start", []).append(_ranks(checkout, root))
            rows.setdefault("feed", []).append(_run(checkout, "feed", root, str(steps)))
    print(
        f"\n{count} files in {tree}; page cache {'dropped' if cold else 'warm'} before each "
        f"first start; {os.cpu_count()} CPUs; medians of {repeats}\n"
    )
    print(
        "| code | first start (s) | µs/file | next start (s) | µs/file | 2 ranks first (s) | "
        "training thread µs/sample | loader images/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():

        def med(key: str, field: str, rows: dict = rows) -> float:
            return statistics.median(r[field] for r in rows[key])

        files = rows["first start"][0]["files"]
        first, following = med("first start", "seconds"), med("next start", "seconds")
        two = f"{med('2 ranks at once, first start', 'seconds'):.2f}" if ranks > 1 else "–"
        cells = [
            name,
            f"{first:.2f}",
            f"{1e6 * first / files:.0f}",
            f"{following:.2f}",
            f"{1e6 * following / files:.0f}",
            two,
            f"{med('feed', 'thread_us_per_sample'):.1f}",
            f"{med('feed', 'images_per_s'):.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if index_entries:
        found = index_load(index_entries)
        print(
            f"\nindex of {found['entries']:,} entries ({found['mib']:.0f} MiB): loaded and "
            f"verified in {found['seconds']:.2f} s"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["--measure"]:
    print(
        json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4] if len(sys.argv) > 4 else 0)))
    )
