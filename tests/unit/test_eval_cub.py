"""The CUB-format demo data, the WSOL view of it, and bad input named in errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data.layouts import load_cub_metadata
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation import cli
from pipeline.evaluation.cub_data import CubBoxDataset
from pipeline.evaluation.cub_synth import _paste, build_cub_demo
from pipeline.evaluation.ood_data import find_images, ood_sets
from pipeline.evaluation.run import evaluate_checkpoint, parse_suite

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def small_cub(tmp_path) -> Path:
    return build_cub_demo(tmp_path / "cub", n_train=3, n_test=2, size=48, num_classes=3, seed=1)


def test_demo_data_is_in_wsolevaluation_layout_with_boxes_inside(small_cub):
    for split, per_class in (("train", 3), ("test", 2)):
        records = load_cub_metadata(small_cub, split)
        assert [r.label for r in records] == [k for k in range(3) for _ in range(per_class)]
        for r in records:
            with Image.open(r.path) as image:
                assert image.format == "JPEG" and image.size == r.size
            assert Path(r.path).parent.name == f"{r.label + 1:03d}.digit_{r.label}"
            ((x0, y0, x1, y1),) = r.boxes
            assert 0 <= x0 < x1 < r.size[0] and 0 <= y0 < y1 < r.size[1]


def test_pasted_digit_lies_in_its_tight_box():
    # On a flat grey canvas, the pixels where the red stroke covers more than half (alpha > 0.5)
    # are exactly those that moved more than halfway to red; the box must bound them tightly.
    canvas = np.full((60, 80, 3), 128.0)
    digit = load_digits().images[0] / 16.0
    image, (x0, y0, x1, y1) = _paste(
        canvas, digit, np.array([255.0, 0.0, 0.0]), np.random.default_rng(0)
    )
    rows, cols = np.nonzero(image[..., 0].astype(float) - 128 > (255 - 128) / 2)
    assert len(rows) > 20
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_demo_data_is_reproducible(tmp_path):
    root = build_cub_demo(tmp_path / "a", n_train=1, n_test=2, size=48, num_classes=2, seed=3)
    again = build_cub_demo(tmp_path / "b", n_train=1, n_test=2, size=48, num_classes=2, seed=3)
    for name in ("image_ids.txt", "localization.txt", "image_sizes.txt"):
        assert (root / "metadata/test" / name).read_text() == (
            again / "metadata/test" / name
        ).read_text()


def test_box_dataset_resizes_images_and_boxes_like_wsolevaluation(small_cub):
    dataset = CubBoxDataset(small_cub, "test", 40, MEAN, STD)
    image, label, index = dataset[1]
    assert image.shape == (3, 40, 40) and label == 0 and index == 1
    record = dataset.records[1]
    (x0, y0, x1, y1) = record.boxes[0]
    w, h = record.size
    assert dataset.boxes(1).tolist() == [
        [int(x0 * 40 / w), int(y0 * 40 / h), int(x1 * 40 / w), int(y1 * 40 / h)]
    ]
    assert dataset.pixels(1).shape == (40, 40, 3)


def test_missing_metadata_file_is_named(small_cub):
    (small_cub / "metadata/test/image_sizes.txt").unlink()
    with pytest.raises(DataError, match=r"metadata/test/image_sizes\.txt"):
        CubBoxDataset(small_cub, "test", 32, MEAN, STD)


def test_box_outside_the_image_is_named_with_file_and_line(small_cub):
    path = small_cub / "metadata/test/localization.txt"
    lines = path.read_text().splitlines()
    image_id = lines[2].split(",")[0]
    width = dict(
        line.split(",", 1)
        for line in (small_cub / "metadata/test/image_sizes.txt").read_text().splitlines()
    )[image_id]
    lines[2] = f"{image_id},5,5,{int(width.split(',')[0]) + 7},20"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"localization\.txt:3: box .* not inside its"):
        CubBoxDataset(small_cub, "test", 32, MEAN, STD)


def test_non_numeric_metadata_field_is_named_with_file_and_line(small_cub):
    path = small_cub / "metadata/test/class_labels.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",bird"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"class_labels\.txt:2: expected int values .*bird"):
        CubBoxDataset(small_cub, "test", 32, MEAN, STD)


def test_image_of_another_size_than_the_metadata_is_named(small_cub):
    dataset = CubBoxDataset(small_cub, "test", 32, MEAN, STD)
    Image.new("RGB", (20, 20)).save(dataset.records[0].path)
    with pytest.raises(DataError, match=r"test_0_0000\.jpg: image is 20x20"):
        dataset[0]


def test_ood_folder_without_images_is_named(tmp_path):
    empty = tmp_path / "no_images_here"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no_images_here: OOD folder holds no images"):
        find_images(empty)
    # The eval command scans OOD folders before it loads anything, so no checkpoint is needed.
    with pytest.raises(DataError, match="no_images_here"):
        evaluate_checkpoint(tmp_path / "missing.pt", ("ood",), [empty])


def test_ood_folder_takes_images_at_any_depth(tmp_path):
    for rel in ("a/x.jpg", "a/b/c/y.png", ".hidden/z.jpg", "w.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(
            tmp_path / rel, format="PNG" if rel.endswith("png") else "JPEG"
        )
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == ["a/b/c/y.png", "a/x.jpg", "w.JPEG"]
    sets = ood_sets(["/x/svhn", "/y/svhn", "/z/lsun crop", "tin=/data/tiny-imagenet/val"])
    assert sets == {
        "svhn": Path("/x/svhn"),
        "svhn_2": Path("/y/svhn"),
        "lsun_crop": Path("/z/lsun crop"),
        "tin": Path("/data/tiny-imagenet/val"),
    }


def test_unknown_suite_part_is_named():
    with pytest.raises(PipelineError, match="'classify,robust'"):
        parse_suite("classify,robust")


def test_make_cub_demo_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "make-cub-demo",
            str(tmp_path / "demo"),
            "--n-train",
            "1",
            "--n-test",
            "1",
            "--size",
            "32",
            "--classes",
            "2",
        ]
    )
    assert args.func(args) == 0
    assert len(load_cub_metadata(tmp_path / "demo", "test")) == 2
    assert "ready in" in capsys.readouterr().out
    bad = parser.parse_args(["make-cub-demo", str(tmp_path / "bad"), "--classes", "11"])
    with pytest.raises(PipelineError, match="--classes 11"):
        bad.func(bad)
