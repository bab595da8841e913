"""Dataset layouts, bad files, `check-data` and the digits demo dataset, on real files."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
from PIL import Image

from pipeline.data import build_loaders, load_cub_metadata
from pipeline.data.cli import register
from pipeline.data.demo import build_digits_dataset
from pipeline.errors import DataError
from tests.image_folders import break_dataset, cfg, photo, write_imagefolder

pytestmark = pytest.mark.filterwarnings("ignore::Warning:nvidia.dali")


@pytest.fixture
def good_root(tmp_path):
    root = tmp_path / "good"
    write_imagefolder(root)
    return root


def test_imagefolder_labels_follow_sorted_class_folders(good_root):
    loaders = build_loaders(cfg(good_root), 0, 1, "cpu", 0)
    assert loaders.class_names == ["cat", "dog"] and loaders.num_classes == 2
    idx = loaders.train_index
    assert [os.path.basename(os.path.dirname(f)) for f in idx.files] == ["cat"] * 4 + ["dog"] * 4
    assert idx.labels == [0] * 4 + [1] * 4
    assert loaders.skipped == []


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_bad_files_raise_error_naming_each(good_root, backend):
    bad = break_dataset(good_root)
    with pytest.raises(DataError) as err:
        build_loaders(cfg(good_root, backend), 0, 1, "cpu", 0)
    message = str(err.value)
    train_bad = [p for p in bad if "/train/" in p]
    for path in train_bad:  # train is checked first and names both of its bad files
        assert path in message and bad[path] in message
    assert "skip_corrupt" in message


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_skip_corrupt_skips_and_counts(good_root, backend):
    bad = break_dataset(good_root)
    loaders = build_loaders(cfg(good_root, backend, skip_corrupt=True), 0, 1, "cpu", 0)
    assert len(loaders.skipped) == 4
    for path, words in bad.items():
        assert any(s.startswith(path) and words in s for s in loaders.skipped)
    assert len(loaders.train_index) == 7 and len(loaders.val_index) == 8
    assert not set(bad) & set(loaders.train_index.files + loaders.val_index.files)
    labels = [y for _, batch in loaders.train for y in batch.tolist()]
    # 4 good cats, 3 good dogs, plus 1 sample wrapped around to fill the last batch of 2
    assert len(labels) == 8 and labels.count(0) >= 4 and labels.count(1) >= 3


def test_empty_class_folder_is_named(good_root):
    empty = good_root / "train" / "bird"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: empty class folder"):
        build_loaders(cfg(good_root), 0, 1, "cpu", 0)


def test_missing_split_and_missing_root_are_named(good_root, tmp_path):
    shutil.rmtree(good_root / "val")
    with pytest.raises(DataError, match=f"{good_root / 'val'}: split 'val'.*not found"):
        build_loaders(cfg(good_root), 0, 1, "cpu", 0)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}: data folder not found"):
        build_loaders(cfg(missing), 0, 1, "cpu", 0)


def test_val_class_unknown_to_train_is_named(good_root):
    extra = good_root / "val" / "eel"
    extra.mkdir()
    photo(3).save(extra / "eel.JPEG")
    with pytest.raises(DataError, match=f"{extra}: class 'eel' is not among the train classes"):
        build_loaders(cfg(good_root), 0, 1, "cpu", 0)


def test_filelist_layout(good_root):
    (good_root / "train.txt").write_text("train/cat/cat_0.JPEG 1\ntrain/dog/dog_2.JPEG 0\n")
    (good_root / "val.txt").write_text("# comment\nval/dog/dog_0.JPEG 1\n")
    c = cfg(good_root, layout="filelist", train_list="train.txt", val_list="val.txt")
    loaders = build_loaders(c, 0, 1, "cpu", 0)
    assert loaders.train_index.files == [
        str(good_root / "train/cat/cat_0.JPEG"),
        str(good_root / "train/dog/dog_2.JPEG"),
    ]
    assert loaders.train_index.labels == [1, 0] and loaders.num_classes == 2
    assert [y for _, b in loaders.val for y in b.tolist()] == [1, -1]
    (good_root / "val.txt").write_text("val/dog/dog_0.JPEG one\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected 'path label'"):
        build_loaders(c, 0, 1, "cpu", 0)


def write_cub(root) -> None:
    """A two-class CUB tree in wsolevaluation's metadata layout (one image with two boxes)."""
    images = {"train": ["001.Albatross/a_0.jpg", "002.Grebe/g_0.jpg", "002.Grebe/g_1.jpg"]}
    images["test"] = ["001.Albatross/a_1.jpg", "002.Grebe/g_2.jpg"]
    for split, paths in images.items():
        meta = root / "metadata" / split
        meta.mkdir(parents=True)
        rows = {"image_ids.txt": [], "class_labels.txt": [], "image_sizes.txt": []}
        boxes = []
        for k, rel in enumerate(paths):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img = photo(k, size=(60 + 4 * k, 50))
            img.save(root / rel, quality=90)
            label = int(rel[:3]) - 1
            rows["image_ids.txt"].append(rel)
            rows["class_labels.txt"].append(f"{rel},{label}")
            rows["image_sizes.txt"].append(f"{rel},{img.width},{img.height}")
            boxes.append(f"{rel},{5 + k},6,30,40")
            if k == 1:
                boxes.append(f"{rel},1,2,3,4")
        rows["localization.txt"] = boxes
        for name, lines in rows.items():
            (meta / name).write_text("\n".join(lines) + "\n")


def test_cub_metadata_and_loaders(tmp_path):
    write_cub(tmp_path)
    records = load_cub_metadata(tmp_path, "train")
    assert [r.path for r in records] == [
        str(tmp_path / "001.Albatross/a_0.jpg"),
        str(tmp_path / "002.Grebe/g_0.jpg"),
        str(tmp_path / "002.Grebe/g_1.jpg"),
    ]
    assert [r.label for r in records] == [0, 1, 1]
    assert records[1].boxes == [(6.0, 6.0, 30.0, 40.0), (1.0, 2.0, 3.0, 4.0)]
    assert records[2].size == (68, 50)
    loaders = build_loaders(cfg(tmp_path, layout="cub"), 0, 1, "cpu", 0)
    assert loaders.class_names == ["001.Albatross", "002.Grebe"]
    assert len(loaders.val_index) == 2  # the loaders validate on wsolevaluation's test split
    (tmp_path / "metadata" / "test" / "image_sizes.txt").write_text("001.Albatross/a_1.jpg,1\n")
    with pytest.raises(DataError, match=r"image_sizes\.txt:1: expected 3 comma-separated"):
        load_cub_metadata(tmp_path, "test")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_data_good_and_bad(good_root, capsys):
    assert run_cli(["check-data", str(good_root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "classes: 2 (cat, dog)" in out and "train: 8 images" in out and "problems: none" in out
    bad = break_dataset(good_root)
    (good_root / "train" / "bird").mkdir()
    assert run_cli(["check-data", str(good_root)]) == 2
    out = capsys.readouterr().out
    for path in bad:
        assert path in out
    assert f"{good_root / 'train' / 'bird'}: empty class folder" in out


def test_check_data_full_decode_catches_what_headers_miss(good_root, capsys):
    # A broken Huffman table: the header parses, only decoding the image data fails.
    target = good_root / "val" / "dog" / "dog_3.JPEG"
    data = bytearray(target.read_bytes())
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    target.write_bytes(bytes(data))
    assert run_cli(["check-data", str(good_root), "--quick"]) == 0
    capsys.readouterr()
    assert run_cli(["check-data", str(good_root)]) == 2
    assert f"{target}: corrupt image" in capsys.readouterr().out


def test_digits_demo_dataset(tmp_path, capsys):
    root = tmp_path / "digits"
    assert run_cli(["make-demo-data", str(root)]) == 0
    files = sorted(root.glob("*/*/*.JPEG"))
    assert len(files) == 1797
    train = [f for f in files if f.parts[-3] == "train"]
    assert len(train) == 1437  # sklearn's stratified 80/20 split of 1,797
    per_class = {d.name: len(list(d.iterdir())) for d in (root / "val").iterdir()}
    assert sorted(per_class) == [str(d) for d in range(10)]
    assert all(35 <= n <= 37 for n in per_class.values())  # stratified: ~10% of 360 each
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    stamp = files[0].stat().st_mtime_ns
    build_digits_dataset(root)  # same parameters: nothing rewritten
    assert files[0].stat().st_mtime_ns == stamp
    assert json.loads((root / "demo_dataset.json").read_text())["size"] == 32
    demo = {"train_size": 32, "val_resize": 32, "val_crop": 32, "crop_area": (0.6, 1.0)}
    demo.update(color_jitter=0.0, lighting=0.0, flip=False, batch_size=64)
    for backend in ("dali", "torchvision"):
        loaders = build_loaders(cfg(root, backend, **demo), 0, 1, "cpu", 0)
        assert loaders.num_classes == 10 and len(loaders.train) == 23
        x, y = next(iter(loaders.val))
        assert x.shape == (64, 3, 32, 32) and y.tolist()[:3] == [0, 0, 0]
