"""The DALI (CPU-only) and torchvision loaders: same files, same tensors, sharding and epochs.

Two datasets of real JPEGs written here: *coded* images are flat colours whose red level
encodes the sample id (a flat JPEG decodes to within ±1 grey level), so the id of every
sample a loader yields can be read back from its pixels; *photo* crops from scikit-learn's
sample photos test the pixel agreement of the two backends.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import build_loaders
from pipeline.data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, draw_train_params, lighting_rgb

BACKENDS = ("dali", "torchvision")
N_CODED = 45  # 3 classes of 15
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Tolerances between the two decoders/resizers, in grey levels of [0, 255] pixels (measured:
# val max 1 level; train mean 0.6, max 8 levels at crop borders where the resize filters differ).
VAL_MAX_LEVELS = 2
TRAIN_MEAN_LEVELS, TRAIN_MAX_LEVELS = 1.0, 12

pytestmark = pytest.mark.filterwarnings("ignore::Warning:nvidia.dali")


def red_level(sample_id: int) -> int:
    return 20 + 4 * sample_id


def write_coded(root, n: int = N_CODED) -> None:
    """Flat-colour JPEGs: sample i has red 20 + 4i, class i % 3; mixed portrait/landscape."""
    for i in range(n):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (40, 30) if i % 2 else (28, 36)
        Image.new("RGB", size, (red_level(i), 128, 90)).save(folder / f"s{i:02d}.JPEG", quality=95)
    for i in range(n):  # val holds the same images, so ids read back the same way
        src = root / "train" / f"c{i % 3}" / f"s{i:02d}.JPEG"
        dst = root / "val" / f"c{i % 3}"
        dst.mkdir(parents=True, exist_ok=True)
        (dst / src.name).write_bytes(src.read_bytes())


def write_photos(root, n: int = 16) -> None:
    """Crops of sklearn's two sample photos, 96×72 or 64×88, quality 90, in train and val."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % 2]
        y0, x0 = rng.integers(0, p.shape[0] - 200), rng.integers(0, p.shape[1] - 260)
        img = Image.fromarray(p[y0 : y0 + 200, x0 : x0 + 260])
        img = img.resize((96, 72) if i % 3 else (64, 88), Image.BILINEAR)
        for split in ("train", "val"):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            img.save(root / split / f"c{i % 2}" / f"img{i:02d}.JPEG", quality=90)


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    write_coded(root)
    return root


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_photos(root)
    return root


def cfg(root, backend: str, **kw) -> DataConfig:
    base = {
        "backend": backend,
        "root": str(root),
        "batch_size": 4,
        "num_threads": 1,
        "train_size": 16,
        "val_resize": 16,
        "val_crop": 16,
        "color_jitter": 0.0,
        "lighting": 0.0,
        "flip": False,
    }
    base.update(kw)
    return DataConfig(**base)


def ids_of(images: torch.Tensor) -> list[int]:
    """Read back sample ids from flat-colour images (red channel, undo normalisation)."""
    red = (images[:, 0] * STD[0] + MEAN[0]) * 255
    return [round((v - 20) / 4) for v in red.mean(dim=(1, 2)).tolist()]


def run_epoch(loader) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for images, y in loader:
        assert images.dtype == torch.float32 and y.dtype == torch.int64
        ids += ids_of(images)
        labels += y.tolist()
    return ids, labels


def test_coded_images_read_back(coded_root):
    # The id channel must survive JPEG, crop and resize, or the tests below prove nothing.
    loaders = build_loaders(cfg(coded_root, "torchvision"), 0, 1, "cpu", 0)
    names = [p.split("/")[-1] for p in loaders.val_index.files]
    ids, labels = run_epoch(loaders.val)
    expected = [int(name[1:3]) for name in names]
    assert ids[: len(expected)] == expected
    assert labels[: len(expected)] == [i % 3 for i in expected]


@pytest.mark.parametrize("world_size", [1, 2])
def test_backends_same_files_labels_and_shards(coded_root, world_size):
    runs = {}
    for backend in BACKENDS:
        per_rank = []
        for rank in range(world_size):
            loaders = build_loaders(cfg(coded_root, backend), rank, world_size, "cpu", seed=3)
            assert loaders.num_classes == 3 and loaders.class_names == ["c0", "c1", "c2"]
            loaders.train.set_epoch(1)
            per_rank.append((len(loaders.train), len(loaders.val), run_epoch(loaders.train)))
        runs[backend] = per_rank
    # Same step counts on every rank and backend; same samples in the same order and labels.
    assert runs["dali"] == runs["torchvision"]
    steps = {r[0] for r in runs["dali"]}
    assert steps == {-(-N_CODED // (4 * world_size))}


def test_two_ranks_disjoint_and_cover_epoch(coded_root):
    # 45 samples, 3 ranks × batch 5 = 15 per step: no padding, so shards are disjoint and cover.
    for backend in BACKENDS:
        seen = []
        for rank in range(3):
            loaders = build_loaders(cfg(coded_root, backend, batch_size=5), rank, 3, "cpu", 0)
            loaders.train.set_epoch(2)
            ids, labels = run_epoch(loaders.train)
            assert labels == [i % 3 for i in ids]
            seen.append(set(ids))
            assert len(ids) == 15
        assert set.union(*seen) == set(range(N_CODED))
        assert sum(len(s) for s in seen) == N_CODED


def test_padding_wraps_train_and_marks_val(coded_root):
    # 45 samples, 2 ranks × batch 4 = 8 per step → 6 steps, 48 slots, 3 padded.
    train_ids, val_ids, val_pad = [], [], 0
    for rank in range(2):
        loaders = build_loaders(cfg(coded_root, "dali"), rank, 2, "cpu", 0)
        assert len(loaders.train) == len(loaders.val) == 6
        train_ids += run_epoch(loaders.train)[0]
        ids, labels = run_epoch(loaders.val)
        val_ids += [i for i, y in zip(ids, labels, strict=True) if y >= 0]
        val_pad += labels.count(-1)
    counts = Counter(train_ids)
    assert set(counts) == set(range(N_CODED)) and len(train_ids) == 48
    assert sorted(counts.values()) == [1] * 42 + [2] * 3  # three samples wrapped around
    assert sorted(val_ids) == list(range(N_CODED)) and val_pad == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_reshuffles_deterministically_and_resumes(coded_root, backend):
    def epoch(seed: int, e: int, start: int = 0):
        loader = build_loaders(cfg(coded_root, backend, flip=True), 0, 2, "cpu", seed).train
        loader.set_epoch(e, start_step=start)
        return [(x, y) for x, y in loader]

    e0, e1 = epoch(0, 0), epoch(0, 1)
    order0 = ids_of(torch.cat([x for x, _ in e0]))
    order1 = ids_of(torch.cat([x for x, _ in e1]))
    assert order0 != order1 and sorted(order0) != order1
    again = epoch(0, 1)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, again, strict=True)
    )
    assert ids_of(torch.cat([x for x, _ in epoch(1, 1)])) != order1
    tail = epoch(0, 1, start=4)
    assert len(tail) == len(e1) - 4
    for (xa, ya), (xb, yb) in zip(tail, e1[4:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_start_step_applies_to_one_iteration(coded_root):
    loader = build_loaders(cfg(coded_root, "dali"), 0, 1, "cpu", 0).train
    loader.set_epoch(0, start_step=10)
    assert sum(1 for _ in loader) == len(loader) - 10
    assert sum(1 for _ in loader) == len(loader)
    with pytest.raises(ValueError, match="start_step"):
        loader.set_epoch(0, start_step=len(loader) + 1)


def test_dali_draws_the_same_batches_with_or_without_worker_processes(photo_root):
    """data.plan_workers only moves where the parameters are drawn: the batches are equal."""
    kw = {"batch_size": 4, "flip": True, "lighting": 0.1, "color_jitter": 0.4}
    epochs = []
    for workers in (0, 2):
        loader = build_loaders(cfg(photo_root, "dali", plan_workers=workers, **kw), 0, 1, "cpu", 3)
        loader.train.set_epoch(1, start_step=1)
        epochs.append(list(loader.train))
    assert len(epochs[0]) == len(epochs[1]) > 0
    for (x0, y0), (x1, y1) in zip(*epochs, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in grey levels of [0, 255] pixels (undo the per-channel std)."""
    return (a - b).abs() * torch.tensor(STD)[None, :, None, None] * 255


def test_dali_matches_torchvision_pixels(photo_root):
    kw = {"train_size": 32, "val_resize": 40, "val_crop": 32, "flip": True, "lighting": 0.1}
    out = {}
    for backend in BACKENDS:
        loaders = build_loaders(cfg(photo_root, backend, batch_size=8, **kw), 0, 1, "cpu", 5)
        out[backend] = [list(loaders.train), list(loaders.val)]
    val = torch.cat(
        [_levels(a[0], b[0]) for a, b in zip(*(out[b][1] for b in BACKENDS), strict=True)]
    )
    assert val.max() <= VAL_MAX_LEVELS
    train = torch.cat(
        [_levels(a[0], b[0]) for a, b in zip(*(out[b][0] for b in BACKENDS), strict=True)]
    )
    assert train.mean() <= TRAIN_MEAN_LEVELS and train.max() <= TRAIN_MAX_LEVELS
    x = out["dali"][1][0][0]
    assert x.shape == (8, 3, 32, 32)
    # A crop larger than the resized image: both pad with black around the centre; the resized
    # image's border pixels, where the two resizers differ (as in train), are in view here.
    padded = [
        next(
            iter(build_loaders(cfg(photo_root, b, val_resize=24, val_crop=30), 0, 1, "cpu", 0).val)
        )
        for b in BACKENDS
    ]
    pad_diff = _levels(padded[0][0], padded[1][0])
    assert pad_diff.mean() <= TRAIN_MEAN_LEVELS and pad_diff.max() <= TRAIN_MAX_LEVELS
    # Normalised: pixels in [0, 1] map into [(0 − m)/s, (1 − m)/s].
    assert x.min() >= -MEAN[0] / STD[0] - 1e-4 and x.max() <= (1 - MEAN[2]) / STD[2] + 1e-4


def authors_lighting(img: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The authors' Lighting transform, written in their style, with a given alpha."""
    eigval = torch.tensor(IMAGENET_EIGVAL)
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    rgb = eigvec.clone().mul(alpha.view(1, 3).expand(3, 3)).mul(eigval.view(1, 3).expand(3, 3))
    return img.add(rgb.sum(1).squeeze().view(3, 1, 1).expand_as(img))


def test_lighting_rgb_matches_authors_formula():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        alpha = torch.randn(3, generator=gen) * 0.1
        img = torch.rand(3, 4, 4, generator=gen)
        shift = torch.tensor(lighting_rgb(tuple(alpha.tolist())))
        torch.testing.assert_close(img + shift[:, None, None], authors_lighting(img, alpha))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lighting_shifts_each_image_by_its_drawn_offset(photo_root, backend):
    kw = {"train_size": 24, "batch_size": 16, "flip": True}
    plain = build_loaders(cfg(photo_root, backend, **kw), 0, 1, "cpu", 7)
    lit = build_loaders(cfg(photo_root, backend, lighting=0.1, **kw), 0, 1, "cpu", 7)
    (x0, _), (x1, _) = next(iter(plain.train)), next(iter(lit.train))
    plan = lit.train.plan()
    c = lit.train.cfg
    for k in range(16):
        fid, seed = int(plan.file_ids[k]), int(plan.seeds[k])
        alpha = torch.tensor(draw_train_params(seed, lit.train.sizes[fid], c).alpha)
        expected = authors_lighting(torch.zeros(3, 1, 1), alpha).view(3) / torch.tensor(STD)
        diff = (x1[k] - x0[k]).mean(dim=(1, 2))
        torch.testing.assert_close(diff, expected, atol=1e-4, rtol=0)
        assert (x1[k] - x0[k] - diff[:, None, None]).abs().max() < 1e-4  # one shift per channel


def test_lighting_alpha_is_gaussian_with_recipe_std():
    c = cfg(".", "dali", lighting=0.1)
    alphas = np.array([draw_train_params(s, (64, 48), c).alpha for s in range(2000)])
    assert abs(alphas.mean()) < 0.01 and 0.09 < alphas.std() < 0.11


@pytest.mark.parametrize("backend", BACKENDS)
def test_color_jitter_changes_colours_not_labels(photo_root, backend):
    kw = {"train_size": 24, "batch_size": 16}
    plain = build_loaders(cfg(photo_root, backend, **kw), 0, 1, "cpu", 1)
    jit = build_loaders(cfg(photo_root, backend, color_jitter=0.4, **kw), 0, 1, "cpu", 1)
    (x0, y0), (x1, y1) = next(iter(plain.train)), next(iter(jit.train))
    assert torch.equal(y0, y1)
    per_image = _levels(x0, x1).mean(dim=(1, 2, 3))
    assert (per_image > 1.0).float().mean() > 0.5  # most images visibly recoloured


def test_max_val_samples_keeps_every_class(coded_root):
    loaders = build_loaders(cfg(coded_root, "dali", max_val_samples=9), 0, 1, "cpu", 0)
    assert len(loaders.val_index) == 9
    assert sorted(Counter(loaders.val_index.labels).values()) == [3, 3, 3]
    _, labels = run_epoch(loaders.val)
    assert sum(y >= 0 for y in labels) == 9


def test_iterating_leaves_global_rng_alone(coded_root):
    # Iterating must not draw from torch's global RNG (a resumed trainer would diverge).
    torch.manual_seed(123)
    expected = torch.rand(3)
    for backend in BACKENDS:
        loaders = build_loaders(cfg(coded_root, backend), 0, 1, "cpu", 0)
        torch.manual_seed(123)
        for x, y in loaders.train:
            assert x.device.type == "cpu" and y.device.type == "cpu"
        assert torch.equal(torch.rand(3), expected)
