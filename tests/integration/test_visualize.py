"""`visualize` on a small AE checkpoint in the trainer's model file format, real JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.errors import CheckpointError, DataError
from pipeline.methods import build_method
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import TrainerState
from pipeline.runs.model_file import FINAL_MODEL, load_model, model_facts, save_final_model
from pipeline.tools import visualize as visualize_cmd
from pipeline.tools.interpolation import LAMBDAS, alignment_effect, decoded_interpolations
from tests.authors_reference import authors_assignment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128  # resnet18 at 128 px: A is 512 × 4 × 4, so the plan has 16 positions to move

TINY_AE = [
    "method.name=alignmixup_ae",
    "model.name=resnet18",
    "model.ae.embed_channels=16",
    "model.ae.decoder_width=32",
    "model.ae.decoder_min_width=8",
    "model.ae.decoder_blocks=1",
    f"data.val_resize={SIZE}",
    f"data.val_crop={SIZE}",
]


def _calibrate_batchnorm(model: torch.nn.Module) -> None:
    """Set BatchNorm statistics from one random batch, so eval-mode features have a real scale.

    With freshly initialised statistics an untrained decoder's output barely depends on its
    input, and every decoding would look alike.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.decode(model.embed(model.features(torch.randn(8, 3, SIZE, SIZE))))
    for m in norms:
        m.momentum = 0.1


def _save(folder: Path, overrides: list[str], run_id: str | None, uri: str) -> Path:
    recipe = load_recipe(None, [*overrides, f"tracking.tracking_uri={uri}"])
    torch.manual_seed(0)
    model = build_method(recipe.method).build_model(recipe.model, 5)
    if model.has_decoder:
        _calibrate_batchnorm(model)
    folder.mkdir()
    path = folder / FINAL_MODEL
    facts = model_facts(model, 5, list("abcde"))
    save_final_model(path, model, recipe, facts, TrainerState(mlflow_run_id=run_id))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An AE checkpoint tied to a run in a SQLite store, and two JPEGs of different sizes."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("vis")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("vis", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(exp_id, run_name="ae").info.run_id
    ckpt = _save(root / "ae", TINY_AE, run_id, uri)
    rng = np.random.default_rng(0)
    images = []
    for name, (w, h) in {"cat.jpg": (180, 150), "dog.jpg": (150, 200)}.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name, quality=90)
        images.append(root / name)
    return {"root": root, "uri": uri, "run_id": run_id, "ckpt": ckpt, "images": images}


def test_cli_writes_grid_png_and_logs_it(setup, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "grid.png"
    images = [str(p) for p in setup["images"]]
    argv = ["visualize", "--checkpoint", str(setup["ckpt"]), "--images", *images]
    assert main([*argv, "--output", str(out)]) == 0
    # 8 columns (row labels, A, five λ, A′) × 200 px; a 100 px header, 3 rows × 200 px and a
    # 80 px footer with the mean |aligned − unaligned| per λ and the PSNR of λ = 1 against A,
    # which stdout has too.
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1600, 780)
    printed = capsys.readouterr().out
    assert setup["run_id"] in printed and "aligned, eq. 11" in printed
    client = MlflowClient(tracking_uri=setup["uri"])
    logged = [a.path for a in client.list_artifacts(setup["run_id"], "visualize")]
    assert logged == ["visualize/grid.png"]


@pytest.fixture(scope="module")
def decodings(setup):
    """The model, its recipe, both images as the model sees them, and their decoded grid."""
    model, recipe, _ = load_model(setup["ckpt"])
    a, b = (visualize_cmd.load_image(p, recipe.data) for p in setup["images"])
    return model, recipe, a, b, decoded_interpolations(model, a, b, recipe.method.solver())


def test_lambda_one_aligned_equals_unaligned(decodings):
    _, _, a, _, decoded = decodings
    assert a.shape == (3, SIZE, SIZE)
    assert decoded.shape == (3, len(LAMBDAS), 3, SIZE, SIZE)
    one, zero = LAMBDAS.index(1.0), LAMBDAS.index(0.0)
    # λ = 1 in eq. 11 is A itself, as in unaligned mixing
    torch.testing.assert_close(decoded[1, one], decoded[0, one], rtol=0, atol=1e-5)
    # λ = 0 in eq. 12 is A′ itself, as in unaligned mixing
    torch.testing.assert_close(decoded[2, zero], decoded[0, zero], rtol=0, atol=1e-5)
    # but the aligned partner A′Rᵀ is not A′: the rows do differ where alignment acts
    assert (decoded[1, zero] - decoded[0, zero]).abs().max() > 0.1


def _reference_assignment(model, a, b):
    """R for the two images from the authors' algorithm re-derived in float64, and the features."""
    with torch.no_grad():
        feats = model.features(torch.stack([a, b]))
    return authors_assignment(feats[:1], feats[1:], torch.float64)[0].float(), feats


def test_rows_follow_equations_11_and_12(decodings):
    model, _, a, b, decoded = decodings
    r, feats = _reference_assignment(model, a, b)
    fa, fb = feats[0].flatten(1), feats[1].flatten(1)  # (c, r): column i is a_i
    shape = feats.shape[1:]
    with torch.no_grad():
        for col, lam in enumerate(LAMBDAS):
            expected = {
                0: lam * fa + (1 - lam) * fb,
                1: lam * fa + (1 - lam) * fb @ r.T,  # eq. 11: Ã = A′Rᵀ
                2: lam * (fa @ r) + (1 - lam) * fb,  # eq. 12: Ã′ = AR
            }
            for row, mixed in expected.items():
                image = model.decode(model.embed(mixed.view(1, *shape)))[0]
                # float32 against the float64 plan, through the decoder
                torch.testing.assert_close(decoded[row, col], image, rtol=1e-3, atol=5e-4)


def test_alignment_shows_where_the_plan_moves_positions(decodings):
    model, _, a, b, decoded = decodings
    r, _ = _reference_assignment(model, a, b)
    positions = r.shape[0]
    assert positions == 16  # a 4 × 4 map: room to align
    assert r.trace() / positions < 0.5  # most of each position's mass goes elsewhere
    effect = alignment_effect(decoded)  # (eq. 11 / eq. 12, λ)
    one, zero = LAMBDAS.index(1.0), LAMBDAS.index(0.0)
    # Where the equations are unaligned mixing (eq. 11 at λ = 1, eq. 12 at λ = 0) there is no
    # difference; at the other end the whole image is the aligned partner (A′Rᵀ or AR).
    assert effect[0, one] < 1e-6 and effect[1, zero] < 1e-6
    assert effect[0, zero] > 0.05 and effect[1, one] > 0.05
    expected = (decoded[1, zero] - decoded[0, zero]).abs().mean()
    torch.testing.assert_close(effect[0, zero], expected)


def test_checkpoint_without_decoder_is_refused(setup, tmp_path):
    base = [o.replace("alignmixup_ae", "baseline") for o in TINY_AE]
    ckpt = _save(tmp_path / "base", base, None, setup["uri"])
    with pytest.raises(CheckpointError, match="no decoder"):
        visualize_cmd.visualize(ckpt, *setup["images"], tmp_path / "x.png", log=False)


def test_unreadable_image_is_named(setup, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.jpg"):
        visualize_cmd.visualize(setup["ckpt"], setup["images"][0], bad, tmp_path / "x.png")


def test_psnr_against_hand_worked_values():
    from pipeline.tools.interpolation import psnr

    reference = torch.zeros(3, 4, 4)
    assert psnr(reference + 0.1, reference) == pytest.approx(20.0)  # MSE 0.01
    half = reference.clone()
    half[:, :2] = 1.0  # half the pixels off by 1: MSE 0.5, 10·log10(2)
    assert psnr(half, reference) == pytest.approx(3.0103, abs=1e-4)
    assert psnr(reference, reference) == float("inf")


def test_fitting_the_decoder_touches_nothing_else_and_reconstructs_better(setup):
    """Only the decoder's weights and statistics move; L_r on the fitting images falls."""
    from pipeline.tools.interpolation import fit_decoder

    model, _, _ = load_model(setup["ckpt"])
    g = torch.Generator().manual_seed(3)
    # smooth images (a blurred noise field): something a decoder can learn in a few steps
    images = torch.nn.functional.avg_pool2d(torch.randn(24, 3, SIZE, SIZE, generator=g), 9, 1, 4)
    images = images / images.std()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def l_r() -> float:
        with torch.no_grad():
            return float(((model.decode(model.embed(model.features(images))) - images) ** 2).mean())

    start = l_r()
    first, last = fit_decoder(model, images, steps=30, batch_size=8, lr=3e-3)
    assert not model.training and last < first
    assert l_r() < 0.7 * start
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # its BN learnt the new statistics
    assert all(p.requires_grad for p in model.parameters())  # as loaded: nothing left frozen


def test_cli_fits_the_decoder_and_prints_the_psnr(setup, tmp_path, capsys):
    folder = tmp_path / "clean" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image, skipped")
    images = [str(p) for p in setup["images"]]
    argv = ["visualize", "--checkpoint", str(setup["ckpt"]), "--images", *images, "--no-mlflow"]
    argv += ["--output", str(tmp_path / "g.png"), "--fit-decoder-steps", "3"]
    assert main([*argv, "--fit-images", str(tmp_path / "clean"), "--fit-max-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "in 3 steps" in printed and "fitted alone for 3 steps on 4 clean images" in printed
    assert "λ = 1 decodes A: PSNR" in printed and " dB against A" in printed
    (tmp_path / "empty").mkdir()
    assert main([*argv, "--fit-images", str(tmp_path / "empty")]) == 2  # a named error
    assert f"no images under {tmp_path / 'empty'}" in capsys.readouterr().err
