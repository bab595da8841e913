"""The dataset index: built once and reused, rebuilt when the tree changes, shared by two real
gloo ranks that scan once, written ahead by `check-data`, and faithful to bad files."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import build_loaders
from pipeline.data.cli import register
from pipeline.data.index import indexed_split
from pipeline.errors import DataError
from tests.gloo import run_two_ranks
from tests.image_folders import break_dataset, cfg, photo, write_imagefolder

pytestmark = pytest.mark.filterwarnings("ignore::Warning:nvidia.dali")
REPO = Path(__file__).resolve().parents[2]


def age(root: Path, seconds: float = 60) -> None:
    """Date every folder under `root` back, as a dataset that was not just written."""
    past = time.time() - seconds
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (past, past))


def start(root: Path, **kw):
    """The train and val IndexedSplits one start sees (what build_loaders uses)."""
    loaders = build_loaders(cfg(root, **kw), 0, 1, "cpu", 0)
    return loaders.indexes


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    write_imagefolder(root, per_class=3)
    age(root)
    return root


def test_an_index_is_built_once_then_reused(tree):
    first = start(tree)
    assert [s.built for s in first] == [True, True]
    assert all(s.path.parent == tree / ".pipeline_index" for s in first)
    again = start(tree)
    assert [s.built for s in again] == [False, False]
    for a, b in zip(first, again, strict=True):  # the same files, labels and sizes
        assert a.split.index.files == b.split.index.files
        assert a.split.index.labels == b.split.index.labels
        np.testing.assert_array_equal(a.split.sizes, b.split.sizes)
    assert tuple(again[0].split.sizes[0]) == (80, 60)  # photo()'s size, from the header


@pytest.mark.parametrize("change", ["add a file", "remove a file", "add a class folder"])
def test_a_changed_tree_rebuilds_the_index(tree, change):
    start(tree)
    if change == "add a file":
        photo(7).save(tree / "train" / "cat" / "new.JPEG")
    elif change == "remove a file":
        (tree / "train" / "dog" / "dog_0.JPEG").unlink()
    else:
        (tree / "train" / "bird").mkdir()
        photo(8).save(tree / "train" / "bird" / "b.JPEG")
    age(tree / "train")  # the changed folders, as any dataset not written a moment ago
    train, val = start(tree)
    # A new class changes the class names, and with them the val index's key.
    assert train.built and val.built == (change == "add a class folder")
    names = [Path(f).name for f in train.split.index.files]
    assert ("new.JPEG" in names) == (change == "add a file")
    assert ("dog_0.JPEG" in names) == (change != "remove a file")
    assert ("bird" in train.split.index.class_names) == (change == "add a class folder")
    assert [s.built for s in start(tree)] == [False, False]  # and is reused again


def test_a_just_written_tree_is_scanned_again_at_the_next_start(tmp_path):
    """A folder modified within two seconds before its scan may have changed within one
    timestamp tick of the listing: its index is kept but not trusted."""
    root = tmp_path / "fresh"
    write_imagefolder(root, per_class=2)
    assert [s.built for s in start(root)] == [True, True]
    assert [s.built for s in start(root)] == [True, True]
    age(root)
    start(root)
    assert [s.built for s in start(root)] == [False, False]


def test_an_unwritable_data_folder_keeps_the_index_in_the_fallback(tree, tmp_path):
    (tree / ".pipeline_index").write_text("in the way")  # as a folder we may not write to
    fallback = tmp_path / "runs" / "data_index"
    built = indexed_split(cfg(tree), "train", None, fallback)
    assert built.built and built.path.parent == fallback
    again = indexed_split(cfg(tree), "train", None, fallback)
    assert not again.built and again.path == built.path


def test_a_damaged_index_is_built_again(tree):
    first = start(tree)
    first[0].path.write_bytes(first[0].path.read_bytes()[:100])  # cut short, as by a full disk
    assert [s.built for s in start(tree)] == [True, False]
    assert [s.built for s in start(tree)] == [False, False]


def test_the_recipe_can_name_the_index_folder(tree, tmp_path):
    where = tmp_path / "cache"
    first = start(tree, index_dir=str(where))
    assert all(s.built and s.path.parent == where for s in first)
    assert not (tree / ".pipeline_index").exists()
    assert [s.built for s in start(tree, index_dir=str(where))] == [False, False]


def test_bad_files_are_recorded_in_the_index_and_named_at_every_start(tree):
    expected = break_dataset(tree)
    age(tree)
    for attempt in range(2):  # the scan, then the index
        with pytest.raises(DataError) as err:
            start(tree)
        assert "truncated" in str(err.value), attempt
    skipped = build_loaders(cfg(tree, skip_corrupt=True), 0, 1, "cpu", 0)
    assert not skipped.indexes[0].built  # val's was first reached now: train's error stopped it
    skipped = build_loaders(cfg(tree, skip_corrupt=True), 0, 1, "cpu", 0)
    assert [s.built for s in skipped.indexes] == [False, False]
    assert {s.split(": ", 1)[0] for s in skipped.skipped} == set(expected)
    for entry in skipped.skipped:
        path, what = entry.split(": ", 1)
        assert expected[path] in what


def test_check_data_writes_the_index_the_next_run_loads(tree, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["check-data", str(tree), "--quick", "--workers", "1"])
    assert args.func(args) == 0
    assert "index:" in capsys.readouterr().out
    assert [s.built for s in start(tree)] == [False, False]


def test_an_empty_class_stays_an_error_when_the_index_is_reused(tree):
    (tree / "train" / "fish").mkdir()
    age(tree)
    for _ in range(2):
        with pytest.raises(DataError, match="empty class folder"):
            start(tree)


WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch.distributed as dist
    import pipeline.data.index as index_module
    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    warnings.simplefilter("ignore")
    rank, root, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    calls = {"scan": 0, "checked": 0}
    real_scan, real_inspect = index_module.scan_split, index_module.inspect_files

    def scan(*args, **kwargs):
        calls["scan"] += 1
        return real_scan(*args, **kwargs)

    def inspect(files, *args, **kwargs):
        calls["checked"] += len(files)
        return real_inspect(files, *args, **kwargs)

    index_module.scan_split, index_module.inspect_files = scan, inspect
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = DataConfig(root=root, batch_size=2, num_threads=1, train_size=16, val_resize=16,
                     val_crop=16, color_jitter=0.0, lighting=0.0)
    loaders = build_loaders(cfg, rank, 2, "cpu", seed=0)
    report = {
        "calls": calls,
        "built": [s.built for s in loaders.indexes],
        "path": [str(s.path) for s in loaders.indexes],
        "files": loaders.train_index.files,
        "sizes": loaders.indexes[0].split.sizes.tolist(),
    }
    gathered = [None, None]
    dist.all_gather_object(gathered, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
    """
)


def test_two_gloo_ranks_starting_at_once_scan_once_and_share_the_index(tree, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    store = tmp_path / "store"
    run_two_ranks(script, [str(tree), str(store), str(out)], timeout=180)
    rank0, rank1 = json.loads(out.read_text())
    # One scan per split, on rank 0; each rank checked its half of the 12 files.
    assert rank0["calls"]["scan"] == 2 and rank1["calls"]["scan"] == 0
    assert rank0["calls"]["checked"] == rank1["calls"]["checked"] == 6
    assert rank0["built"] == rank1["built"] == [True, True]
    assert rank0["files"] == rank1["files"] and rank0["sizes"] == rank1["sizes"]
    assert all(Path(p).is_file() for p in rank0["path"]) and rank1["path"] == ["None", "None"]
    # The next start of one process reads what the two ranks wrote.
    assert [s.built for s in start(tree)] == [False, False]
