"""Two real processes joined by torch.distributed (gloo) read disjoint shards covering the epoch.

Each image is a flat colour whose red level encodes its sample id, so each rank reports the
ids it actually decoded; rank 0 all-gathers them and writes them out for the test to check.
"""

from __future__ import annotations

import json
import textwrap

from PIL import Image

from tests.gloo import run_two_ranks

N = 40  # 2 ranks × batch 4 = 8 per step: 5 steps, no padding

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch.distributed as dist
    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    warnings.simplefilter("ignore")
    rank, root, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    result = {}
    for backend in ("dali", "torchvision"):
        cfg = DataConfig(backend=backend, root=root, batch_size=4, num_threads=1, train_size=16,
                         val_resize=16, val_crop=16, color_jitter=0.0, lighting=0.0)
        loaders = build_loaders(cfg, dist.get_rank(), dist.get_world_size(), "cpu", seed=11)
        loaders.train.set_epoch(3)
        for name, loader in (("train", loaders.train), ("val", loaders.val)):
            ids, labels = [], []
            for images, y in loader:
                red = (images[:, 0] * 0.229 + 0.485) * 255
                ids += [round((v - 20) / 4) for v in red.mean(dim=(1, 2)).tolist()]
                labels += y.tolist()
            gathered = [None, None]
            dist.all_gather_object(gathered, {"ids": ids, "labels": labels, "steps": len(loader)})
            result[f"{backend}/{name}"] = gathered
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
    """
)


def test_two_gloo_ranks_disjoint_and_cover(tmp_path):
    root = tmp_path / "data"
    for i in range(N):
        for split in ("train", "val"):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.new("RGB", (24, 20), (20 + 4 * i, 128, 90))
            img.save(folder / f"s{i:02d}.JPEG", quality=95)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    store = tmp_path / "store"
    run_two_ranks(script, [str(root), str(store), str(out)], timeout=180)
    result = json.loads(out.read_text())
    for backend in ("dali", "torchvision"):
        train = result[f"{backend}/train"]
        assert train[0]["steps"] == train[1]["steps"] == 5
        shards = [set(r["ids"]) for r in train]
        assert len(train[0]["ids"]) == len(train[1]["ids"]) == 20
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(N))
        for r in train:
            assert r["labels"] == [i % 2 for i in r["ids"]]
        val = result[f"{backend}/val"]
        assert sorted(val[0]["ids"] + val[1]["ids"]) == list(range(N))
    assert result["dali/train"] == result["torchvision/train"]
