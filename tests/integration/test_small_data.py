"""CIFAR-10/100 and Tiny-ImageNet in memory (pipeline/data/memory.py) and the paper's small-image
backbones (pipeline/models/small.py), against the on-disk formats as distributed, torchvision's
transforms, hand-counted parameters and the authors' published settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare

from pipeline.config import DataConfig, ModelConfig
from pipeline.data import build_loaders
from pipeline.data.memory import augment, read_cifar, read_tinyimagenet
from pipeline.data.sharding import train_plan
from pipeline.errors import DataError
from pipeline.models import build_model, count_parameters
from pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


def _batch(rng, n: int, labels_key: bytes, classes: int) -> dict:
    """One python batch in CIFAR's format: `data` rows of 3072 uint8 (R, G, B planes)."""
    return {
        b"batch_label": b"test batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        labels_key: rng.integers(0, classes, n).tolist(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _dump(obj, path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10(tmp_path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _dump(_batch(rng, 4, b"labels", 10), folder / f"data_batch_{i}")
    _dump(_batch(rng, 6, b"labels", 10), folder / "test_batch")
    names = [f"class{i}".encode() for i in range(10)]
    _dump({b"label_names": names, b"num_cases_per_batch": 4}, folder / "batches.meta")
    return tmp_path


@pytest.fixture
def cifar100(tmp_path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 40), ("test", 10)):
        batch = _batch(rng, n, b"fine_labels", 100)
        batch[b"coarse_labels"] = [y // 5 for y in batch[b"fine_labels"]]
        _dump(batch, folder / name)
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)]}
    meta[b"coarse_label_names"] = [f"c{i}".encode() for i in range(20)]
    _dump(meta, folder / "meta")
    return tmp_path


def test_cifar10_pixels_and_labels_round_trip(cifar10):
    train = read_cifar(cifar10, "cifar10", "train")
    assert train.images.shape == (20, 3, 32, 32) and train.class_names[3] == "class3"
    folder = cifar10 / "cifar-10-batches-py"
    for i in range(1, 6):
        with (folder / f"data_batch_{i}").open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
        rows = slice(4 * (i - 1), 4 * i)
        # Row r: 1024 red bytes, then green, then blue, each 32 rows of 32 pixels.
        red = raw[b"data"][:, :1024].reshape(-1, 32, 32)
        assert np.array_equal(train.images[rows, 0], red)
        assert np.array_equal(train.images[rows, 2, 5], raw[b"data"][:, 2048 + 160 : 2048 + 192])
        assert train.labels[rows].tolist() == raw[b"labels"]
    # The folder itself works as data.root too.
    assert len(read_cifar(folder, "cifar10", "val").labels) == 6


def test_cifar100_reads_the_fine_labels(cifar100):
    val = read_cifar(cifar100, "cifar100", "val")
    with (cifar100 / "cifar-100-python" / "test").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert val.labels.tolist() == raw[b"fine_labels"] and len(val.class_names) == 100


def test_a_missing_batch_or_folder_is_a_named_error(cifar10, tmp_path):
    (cifar10 / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing"):
        read_cifar(cifar10, "cifar10", "train")
    with pytest.raises(DataError, match="no cifar-100-python/ folder"):
        read_cifar(tmp_path / "elsewhere", "cifar100", "train")


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Tiny-ImageNet's layout with 3 classes: real JPEGs, wnids.txt, val_annotations.txt."""
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # the file's order is the label order, not sorted
    rng = np.random.default_rng(2)
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(["n03", "n02", "n03", "n01"]):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(  # greyscale
            root / "val" / "images" / f"val_{i}.JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return tmp_path


def test_tinyimagenet_labels_follow_wnids_and_pixels_are_pils(tiny):
    val = read_tinyimagenet(tiny, "val")
    assert val.class_names == ["n02", "n01", "n03"] and val.labels.tolist() == [2, 0, 2, 1]
    with Image.open(tiny / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG") as im:
        expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(val.images[1], expected)
    train = read_tinyimagenet(tiny, "train")
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and train.images.shape == (6, 3, 64, 64)
    cached = list((tiny / "tiny-imagenet-200" / ".pipeline_index").glob("*.npy"))
    assert len(cached) == 2  # decoded once; a second read loads the same array
    assert np.array_equal(read_tinyimagenet(tiny, "val").images, val.images)


def test_tinyimagenet_without_annotations_is_a_named_error(tiny):
    (tiny / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=r"val_annotations\.txt: missing"):
        read_tinyimagenet(tiny, "val")


def test_device_augmentation_equals_torchvisions_crop_and_flip():
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(1, 256, (64, 3, 32, 32), dtype=np.uint8))
    seeds = torch.from_numpy(rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.int64))
    out = augment(images, seeds, padding=4, flip=True)
    for img, seed, got in zip(images, seeds.tolist(), out, strict=True):
        # The documented rule: top = s mod 9, left = (s div 9) mod 9, flip = (s div 81) mod 2.
        top, left, mirror = seed % 9, (seed // 9) % 9, (seed // 81) % 2
        want = F.crop(F.pad(img, [4], fill=0), top, left, 32, 32)  # RandomCrop(32, padding=4)
        if mirror:
            want = F.horizontal_flip(want)  # RandomHorizontalFlip
        assert torch.equal(got, want), seed
    assert torch.equal(augment(images, seeds, padding=4, flip=False)[:, :, :, :], torch.stack([
        F.crop(F.pad(i, [4], fill=0), s % 9, (s // 9) % 9, 32, 32)
        for i, s in zip(images, seeds.tolist(), strict=True)
    ]))  # fmt: skip


def test_crop_offsets_cover_every_position_uniformly_and_half_are_flipped():
    seeds = np.concatenate(
        [train_plan(np.zeros(50_000), 128, 0, 1, seed=7, epoch=e).seeds for e in range(4)]
    ).astype(np.int64)
    top, left, flip = seeds % 9, (seeds // 9) % 9, (seeds // 81) % 2
    counts = np.bincount(top * 9 + left, minlength=81)
    assert counts.min() > 0 and chisquare(counts).pvalue > 1e-3  # 81 positions, each 1/81
    assert chisquare(np.bincount(flip, minlength=2)).pvalue > 1e-3


def _loaders(root: Path, layout: str, **extra):
    cfg = DataConfig(root=str(root), layout=layout, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    return build_loaders(cfg.model_copy(update=extra), 0, 1, "cpu", seed=5)


def test_loader_batches_are_normalised_and_resume_mid_epoch_exactly(cifar100):
    loaders = _loaders(cifar100, "cifar100")
    assert (len(loaders.train), len(loaders.val), loaders.num_classes) == (5, 2, 100)
    loaders.train.set_epoch(3)
    full = list(loaders.train)
    loaders.train.set_epoch(3, start_step=2)
    assert all(
        torch.equal(a, b) and torch.equal(y, z)
        for (a, y), (b, z) in zip(full[2:], list(loaders.train), strict=True)
    )
    images, labels = next(iter(loaders.val))  # val: no augmentation, (x / 255 - 0.5) / 0.25
    raw = read_cifar(cifar100, "cifar100", "val")
    expected = (torch.from_numpy(raw.images[:8]).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(images, expected)
    assert labels.tolist() == raw.labels[:8].tolist()
    last_labels = list(loaders.val)[-1][1]
    assert (last_labels == -1).sum() == 6  # 10 test images in 2 batches of 8: 6 padding slots


def _preact18_parameters(classes: int) -> int:
    """PreAct ResNet-18 counted by hand from the authors' layer list."""

    def block(cin, cout, stride):
        n = 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
        return n + (cin * cout if stride != 1 or cin != cout else 0)

    stem = 27 * 64 + 2 * 64
    stages = sum(block(a, b, s) for a, b, s in [
        (64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
        (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1),
    ])  # fmt: skip
    return stem + stages + 512 * classes + classes


def _wrn16_8_parameters(classes: int) -> int:
    """WRN-16-8 counted by hand: convolutions with bias, BN before each, BN at the end."""

    def block(cin, cout, stride):
        n = 2 * cin + (9 * cin * cout + cout) + 2 * cout + (9 * cout * cout + cout)
        return n + (cin * cout + cout if stride != 1 or cin != cout else 0)

    stem = 27 * 16 + 16
    stages = sum(block(a, b, s) for a, b, s in [
        (16, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1),
    ])  # fmt: skip
    return stem + stages + 2 * 512 + 512 * classes + classes


@pytest.mark.parametrize(
    ("name", "count", "paper"),
    [("preactresnet18", _preact18_parameters, 11.2e6), ("wrn16_8", _wrn16_8_parameters, 11.0e6)],
)
def test_parameter_counts_match_the_authors_models(name, count, paper):
    model = build_model(ModelConfig(name=name), 100)
    assert count_parameters(model) == count(100)
    assert abs(count(100) - paper) / paper < 0.01


@pytest.mark.parametrize(
    ("name", "side", "shapes"),
    [
        ("preactresnet18", 32, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
        ("preactresnet18", 64, [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)]),
        ("wrn16_8", 32, [(128, 32, 32), (256, 16, 16), (512, 8, 8)]),
        ("wrn16_8", 64, [(128, 64, 64), (256, 32, 32), (512, 16, 16)]),
    ],
)
def test_level_shapes_end_at_the_map_the_authors_align(name, side, shapes):
    model = build_model(ModelConfig(name=name), 10).eval()
    h = torch.randn(2, 3, side, side)
    got = []
    for level in range(model.num_levels):
        h = model.forward_levels(h, level, level + 1)
        got.append(tuple(h.shape[1:]))
    assert got == shapes


def test_the_ae_decodes_back_to_the_input_size():
    recipe = load_recipe(REPO / "recipes" / "cifar100" / "alignmixup_ae.yaml")
    model = build_model(recipe.model, 100, autoencoder=True).eval()
    with torch.no_grad():
        a = model.features(torch.randn(2, 3, 32, 32))
        assert a.shape[1:] == (512, 4, 4)
        assert model.decode(model.embed(a)).shape == (2, 3, 32, 32)


# The authors' settings, read from their cifar10_100/main.py and tiny_imgnet/main.py.
AUTHORS = {
    "cifar10": {"batch": 128, "epochs": 2000, "milestones": [500, 1000, 1500], "side": 32},
    "cifar100": {"batch": 128, "epochs": 2000, "milestones": [500, 1000, 1500], "side": 32},
    "tinyimagenet": {"batch": 256, "epochs": 1200, "milestones": [600, 900], "side": 64},
}
METHODS = ["baseline", "input_mixup", "cutmix", "manifold_mixup", "alignmixup", "alignmixup_ae"]


@pytest.mark.parametrize("dataset", list(AUTHORS))
@pytest.mark.parametrize("method", METHODS)
def test_recipes_use_the_authors_settings(dataset, method):
    recipe = load_recipe(REPO / "recipes" / dataset / f"{method}.yaml")
    want = AUTHORS[dataset]
    assert recipe.method.name == method and recipe.model.name == "preactresnet18"
    assert (recipe.data.layout, recipe.data.batch_size) == (dataset, want["batch"])
    assert (recipe.data.train_size, recipe.data.crop_padding, recipe.data.flip) == (
        want["side"],
        4,
        True,
    )
    o = recipe.optim
    assert (o.name, o.lr, o.reference_batch, o.momentum, o.nesterov) == (
        "authors_sgd",
        0.1,
        want["batch"],
        0.9,
        False,
    )
    assert (o.weight_decay, o.schedule, o.milestones, o.gamma) == (
        1e-4,
        "step",
        want["milestones"],
        0.1,
    )
    assert recipe.train.epochs == want["epochs"]
    if method.startswith("alignmixup"):
        assert recipe.method.alpha == 2.0


@pytest.mark.parametrize("method", ["alignmixup", "alignmixup_ae"])
def test_the_cifar100_recipe_trains_on_a_cifar100_folder(method, cifar100, tmp_path):
    from pipeline.cli import main

    out = tmp_path / "run"
    argv = ["train", "--recipe", str(REPO / "recipes" / "cifar100" / f"{method}.yaml")]
    argv += [f"data.root={cifar100}", f"train.output_dir={out}", "train.max_steps=3"]
    argv += ["data.batch_size=8", "data.num_threads=1", "train.cpu=true", "train.amp=no"]
    argv += ["model.channels_last=false"]
    argv += ["tracking.enabled=false", "model.ae.decoder_width=32", "model.ae.embed_channels=32"]
    assert main(argv) == 0
    assert (out / "model_final.safetensors").is_file()
    if method == "alignmixup":  # the paper's Table 3/4 protocols run on it too
        ood = tmp_path / "ood"
        ood.mkdir()
        for i in range(3):
            Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(ood / f"{i}.png")
        suite = ["--suite", "classify,calibration,fgsm,pgd,ood", "--ood-data", f"lsun={ood}"]
        assert main(["eval", "--checkpoint", str(out), *suite, "--no-mlflow"]) == 0


def test_compare_draws_the_authors_curve_and_gives_the_gap(tmp_path):
    import csv

    from pipeline.tools.compare import write_comparison
    from pipeline.tools.compare_plots import draw_val_curves
    from pipeline.tools.compare_table import row
    from pipeline.tools.reference import references_for

    params = {"method.name": "alignmixup", "model.name": "preactresnet18"}
    params["data.layout"] = "cifar100"
    mine = row("short", params, {"final/top1_err": 60.0}, "id1")
    other = row("digits", {"method.name": "baseline", "model.name": "resnet10t"}, {}, "id2")
    curves = {"short": [(1, 90.0), (2, 75.0), (3, 60.0)], "digits": [(1, 5.0)]}
    files = write_comparison([mine, other], curves, tmp_path)
    with (REPO / "pipeline/tools/reference_curves/cifar100_preactresnet18.csv").open() as f:
        theirs = {int(r["epoch"]): 100 - float(r["test_top1_acc"]) for r in csv.DictReader(f)}
    with files["csv"].open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert float(table["short"]["authors' top-1 err then (%)"]) == pytest.approx(theirs[3])
    assert float(table["short"]["gap to authors (% points)"]) == pytest.approx(60.0 - theirs[3])
    assert table["digits"]["gap to authors (% points)"] == ""  # no curve for that setting
    assert files["val_curves"].read_bytes()[:4] == b"\x89PNG"
    fig = draw_val_curves(curves, references_for([mine, other]))
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["authors: cifar100_preactresnet18", "short", "digits"]
    assert max(fig.axes[0].get_lines()[0].get_xdata()) == 3  # cut at the runs' last epoch
