"""SaliencyMix, ResizeMix and FMix: what each pastes and where, rebuilt here independently of
pipeline.mixing (OpenCV called directly, PIL for the resize, changed pixels counted), the labels
weighted by what was pasted, the loss λ·CE(y) + (1−λ)·CE(y[π]), repeatable draws, and settings
errors that name the key."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.errors import RecipeError
from pipeline.methods import build_method
from pipeline.mixing.boxes import resizemix, saliency_box, saliency_map, saliencymix
from pipeline.mixing.fmix import fmix, fmix_mask
from pipeline.models import build_model
from pipeline.recipe import load_recipe

B, K = 8, 10
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="test_resnet", output_stride=8), K).eval()


def _batch(size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g), torch.randint(0, K, (B,), generator=g)


def _method(name, *overrides):
    return build_method(load_recipe(None, [f"method.name={name}", *overrides]).method)


def _mixed_ce(logits, y, perm, lam):
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])


def _model_input(model):
    """The images the model's first stage sees, one entry per call."""
    seen = []
    model.stages[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    return seen


def _changed_box(mixed, x):
    """The pixels where `mixed` differs from `x` in some channel of some sample, checked to be
    one axis-aligned box; → (y0, y1, x0, x1), or (0, 0, 0, 0) where nothing changed."""
    changed = (mixed != x).any(dim=(0, 1)) if mixed.dim() == 4 else (mixed != x).any(dim=0)
    if not changed.any():
        return 0, 0, 0, 0
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert changed[y0:y1, x0:x1].all() and int(changed.sum()) == (y1 - y0) * (x1 - x0)
    return y0, y1, x0, x1


def _opencv_peak(image):
    """The fine-grained saliency peak of a normalised (3, H, W) RGB image, by calling OpenCV
    here: one min-max scaling to 0..255 over all channels, BGR order, first argmax."""
    a = image.numpy().astype(np.float64)
    u8 = np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    bgr = np.ascontiguousarray(u8[::-1].transpose(1, 2, 0))
    ok, saliency = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(bgr)
    assert ok
    return np.unravel_index(int(np.argmax(saliency)), saliency.shape)


def _dot(size, cy, cx, base, bright):
    """A normalised RGB flat field of grey `base` with one pixel of grey `bright` at (cy, cx).

    A one-pixel square: OpenCV's detector scores the dark surround of a larger square as high
    as the square itself (its on- and off-centre maps are each scaled to 255), so only a dot
    has one known peak. Its border windows are clipped, so the dot stays 12 px inside."""
    image = torch.full((3, size, size), base)
    image[:, cy, cx] = bright
    return (image - MEAN) / STD


# --- SaliencyMix -----------------------------------------------------------------------------


def test_the_saliency_map_is_opencvs_on_the_min_max_scaled_image():
    x, _ = _batch(size=48)
    saliency = saliency_map(x[0])
    a = x[0].numpy().astype(np.float64)
    u8 = np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    bgr = np.ascontiguousarray(u8[::-1].transpose(1, 2, 0))
    _, expected = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(bgr)
    expected = torch.from_numpy(np.asarray(expected, np.float32))
    if expected.max() > 1:
        expected = expected / 255
    assert saliency.shape == (48, 48) and saliency.dtype == torch.float32
    torch.testing.assert_close(saliency, expected, rtol=0, atol=0)
    # an affine change of the whole image (another normalisation) gives the same map
    torch.testing.assert_close(saliency_map(x[0] * 4.0), saliency, rtol=0, atol=0)


@pytest.mark.parametrize("lam", [0.3, 0.55, 0.8])
def test_the_box_is_centred_on_the_saliency_peak_of_a_bright_dot(lam):
    g = np.random.default_rng(int(lam * 100))
    size = 64
    for _ in range(8):
        cy, cx = (int(v) for v in g.integers(12, size - 12, 2))
        base = float(g.uniform(0.0, 0.6))
        image = _dot(size, cy, cx, base, float(g.uniform(base + 0.3, 1.0)))
        peak = divmod(int(saliency_map(image).flatten().argmax()), size)
        assert max(abs(peak[0] - cy), abs(peak[1] - cx)) <= 1, (peak, (cy, cx))
        y0, y1, x0, x1 = saliency_box(saliency_map(image), lam)
        cut = int(size * math.sqrt(1 - lam))
        # the sides are CutMix's (cut // 2 on each side of the peak), clipped to the image
        assert (y0, y1) == (max(peak[0] - cut // 2, 0), min(peak[0] + cut // 2, size))
        assert (x0, x1) == (max(peak[1] - cut // 2, 0), min(peak[1] + cut // 2, size))
        if y0 > 0 and y1 < size:
            assert abs((y0 + y1 - 1) / 2 - cy) <= 1.0
        if x0 > 0 and x1 < size:
            assert abs((x0 + x1 - 1) / 2 - cx) <= 1.0


def test_saliencymix_pastes_the_box_around_the_first_partners_dot_weighted_by_area():
    size, lam = 64, 0.6
    x, _ = _batch(size=size)
    perm = torch.tensor([3, 0, 1, 2, 5, 4, 7, 6])
    x[3] = _dot(size, 20, 41, 0.3, 0.9)  # the first partner, x[π[0]]
    mixed, lam_box = saliencymix(x, perm, lam)
    y0, y1, x0, x1 = _changed_box(mixed, x)
    assert abs((y0 + y1 - 1) / 2 - 20) <= 1 and abs((x0 + x1 - 1) / 2 - 41) <= 1
    torch.testing.assert_close(mixed[:, :, y0:y1, x0:x1], x[perm][:, :, y0:y1, x0:x1])
    changed = int((mixed != x).any(dim=(0, 1)).sum())
    assert lam_box == 1 - changed / (size * size)  # exactly
    assert abs(lam_box - lam) < 0.05  # the box is inside the image here: λ barely moves


def test_saliencymix_loss_and_box(recorded):
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    out = _method("saliencymix")(model, x, y, torch.Generator().manual_seed(4))
    s, mixed = recorded[-1], seen[-1]
    y0, y1, x0, x1 = _changed_box(mixed, x)
    cy, cx = _opencv_peak(x[s.perm[0]])
    cut = int(32 * math.sqrt(1 - s.lam))
    assert (y0, y1) == (max(cy - cut // 2, 0), min(cy + cut // 2, 32))
    assert (x0, x1) == (max(cx - cut // 2, 0), min(cx + cut // 2, 32))
    lam = 1 - (y1 - y0) * (x1 - x0) / 32**2
    assert float(out.stats["lam"]) == pytest.approx(lam, abs=1e-7)
    torch.testing.assert_close(mixed[:, :, y0:y1, x0:x1], x[s.perm][:, :, y0:y1, x0:x1])
    torch.testing.assert_close(out.logits, model(mixed))
    torch.testing.assert_close(out.loss, _mixed_ce(model(mixed), y, s.perm, lam))


def test_saliencymix_per_image_boxes_follow_each_partner(recorded):
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    out = _method("saliencymix", "method.boxes=per_image")(
        model, x, y, torch.Generator().manual_seed(5)
    )
    s, mixed = recorded[-1], seen[-1]
    lams = []
    for i in range(B):
        cy, cx = _opencv_peak(x[s.perm[i]])
        cut = int(32 * math.sqrt(1 - s.lam))
        y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, 32)
        x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, 32)
        if s.perm[i] != i:  # a sample that is its own partner shows no change
            assert _changed_box(mixed[i], x[i]) == (y0, y1, x0, x1), i
        else:
            torch.testing.assert_close(mixed[i], x[i])
        lams.append(1 - int((y1 - y0) * (x1 - x0)) / 32**2)
    lam = torch.tensor(lams)
    logits = model(mixed)
    ce = F.cross_entropy(logits, y, reduction="none")
    ce_partner = F.cross_entropy(logits, y[s.perm], reduction="none")
    torch.testing.assert_close(out.loss, (lam * ce + (1 - lam) * ce_partner).mean())
    assert float(out.stats["lam"]) == pytest.approx(float(lam.mean()), abs=1e-6)


# --- ResizeMix -------------------------------------------------------------------------------


def _pil_resize(images, h, w):
    """Each channel of (B, C, H, W) resized to h × w by PIL's bilinear filter (which widens its
    support when shrinking, i.e. antialiases), in float32."""
    out = torch.empty(images.shape[0], images.shape[1], h, w)
    for i, image in enumerate(images):
        for c, channel in enumerate(image):
            pil = Image.fromarray(channel.numpy().astype(np.float32), mode="F")
            out[i, c] = torch.from_numpy(np.array(pil.resize((w, h), Image.BILINEAR)))
    return out


def test_resizemix_pastes_the_whole_partner_resized_as_pil_does():
    x, _ = _batch(size=32)
    perm = torch.roll(torch.arange(B), 1)
    for seed, scale in ((0, 0.3), (1, 0.55), (2, 0.8)):
        mixed, lam = resizemix(x, perm, scale, torch.Generator().manual_seed(seed))
        y0, y1, x0, x1 = _changed_box(mixed, x)
        h, w = round(scale * 32), round(scale * 32)
        assert (y1 - y0, x1 - x0) == (h, w)  # the whole patch, never clipped at the border
        assert lam == 1 - h * w / 32**2  # exactly
        expected = _pil_resize(x[perm], h, w)
        torch.testing.assert_close(mixed[:, :, y0:y1, x0:x1], expected, rtol=0, atol=2e-5)


def test_resizemix_nearest_at_half_size_takes_every_other_pixel():
    """Hand-worked: shrinking 8 px to 4 by nearest takes source pixels 0, 2, 4, 6."""
    x = torch.arange(B * 3 * 64, dtype=torch.float32).view(B, 3, 8, 8)
    perm = torch.roll(torch.arange(B), 3)
    mixed, lam = resizemix(x, perm, 0.5, torch.Generator().manual_seed(7), "nearest")
    y0, y1, x0, x1 = _changed_box(mixed, x)
    assert (y1 - y0, x1 - x0) == (4, 4) and lam == 0.75
    torch.testing.assert_close(mixed[:, :, y0:y1, x0:x1], x[perm][:, :, ::2, ::2])


def test_resizemix_loss_and_scale(recorded):
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    scales = []
    for seed in range(12):
        out = _method("resizemix")(model, x, y, torch.Generator().manual_seed(seed))
        s, mixed = recorded[-1], seen[-1]
        scale = 0.1 + 0.7 * s.lam  # Beta(1, 1) = U(0, 1) mapped onto [0.1, 0.8]
        assert float(out.stats["scale"]) == pytest.approx(scale)
        y0, y1, x0, x1 = _changed_box(mixed, x)
        side = round(scale * 32)
        assert (y1 - y0, x1 - x0) == (side, side)
        lam = 1 - side * side / 32**2
        assert float(out.stats["lam"]) == pytest.approx(lam)
        torch.testing.assert_close(
            mixed[:, :, y0:y1, x0:x1], _pil_resize(x[s.perm], side, side), rtol=0, atol=2e-5
        )
        torch.testing.assert_close(out.loss, _mixed_ce(model(mixed), y, s.perm, lam))
        scales.append(scale)
    assert min(scales) >= 0.1 and max(scales) <= 0.8 and max(scales) - min(scales) > 0.3


# --- FMix ------------------------------------------------------------------------------------


def _low_frequency_share(masks, cutoff=0.125):
    """The share of the (mean-removed) masks' spectral energy below `cutoff` cycles/pixel."""
    spectrum = torch.fft.fft2(masks - masks.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    h, w = masks.shape[-2:]
    fy, fx = torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :]
    low = (fy**2 + fx**2).sqrt() < cutoff
    return float(spectrum[..., low].sum() / spectrum.sum())


@pytest.mark.parametrize("shape", [(32, 32), (24, 37)])
def test_fmix_masks_are_binary_with_mean_lambda_and_low_frequency(shape):
    g = torch.Generator().manual_seed(0)
    lams = torch.rand(500, generator=torch.Generator().manual_seed(1)).tolist()
    masks = torch.stack([fmix_mask(lam, shape, 3.0, g) for lam in lams])
    area = shape[0] * shape[1]
    assert masks.shape == (500, *shape) and masks.dtype == torch.float32
    assert ((masks == 0) | (masks == 1)).all()
    error = (masks.mean(dim=(1, 2)) - torch.tensor(lams)).abs()
    assert error.max() <= 1 / area
    # White-noise binary masks of the same λ spread their energy over all frequencies (about
    # π·0.125² ≈ 5 % below 0.125 cycles/pixel); FMix's concentrate it there.
    noise = (torch.rand(500, *shape, generator=g) < torch.tensor(lams)[:, None, None]).float()
    assert _low_frequency_share(noise) < 0.1
    assert _low_frequency_share(masks) > 0.75
    # a larger decay power gives smoother masks still
    smoother = torch.stack([fmix_mask(lam, shape, 6.0, g) for lam in lams[:100]])
    assert _low_frequency_share(smoother) > _low_frequency_share(masks[:100])


def test_fmix_mask_edges():
    g = torch.Generator().manual_seed(0)
    assert fmix_mask(0.0, (8, 8), 3.0, g).sum() == 0
    assert fmix_mask(1.0, (8, 8), 3.0, g).sum() == 64
    one = torch.Generator().manual_seed(3)
    again = torch.Generator().manual_seed(3)
    assert torch.equal(fmix_mask(0.4, (16, 16), 3.0, one), fmix_mask(0.4, (16, 16), 3.0, again))


def test_fmix_selects_pixels_of_x_or_its_partner_with_one_mask(recorded):
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    out = _method("fmix")(model, x, y, torch.Generator().manual_seed(6))
    s, mixed = recorded[-1], seen[-1]
    own = (mixed == x).all(dim=1)  # (B, H, W): every channel is the sample's own
    partner = (mixed == x[s.perm]).all(dim=1)
    assert (own ^ partner).all()  # random images: each pixel is one or the other, never both
    assert (own == own[0]).all()  # one mask for the batch
    lam = float(own[0].float().mean())
    assert abs(lam - s.lam) <= 1 / 32**2
    assert float(out.stats["lam"]) == pytest.approx(lam, abs=1e-7)
    torch.testing.assert_close(out.loss, _mixed_ce(model(mixed), y, s.perm, lam))


def test_fmix_function_returns_the_mask_mean():
    x, _ = _batch(size=16)
    perm = torch.roll(torch.arange(B), 2)
    mixed, lam = fmix(x, perm, 0.37, 3.0, torch.Generator().manual_seed(0))
    mask = fmix_mask(0.37, (16, 16), 3.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed, torch.where(mask.bool(), x, x[perm]))
    assert lam == float(mask.mean()) == round(0.37 * 256) / 256


# --- all three -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("saliencymix", []),
        ("saliencymix", ["method.boxes=per_image"]),
        ("resizemix", []),
        ("resizemix", ["method.interpolation=nearest"]),
        ("fmix", []),
        ("saliencymix", ["method.draws=per_rank"]),
        ("fmix", ["method.draws=per_rank"]),
    ],
)
def test_the_same_seed_and_step_mix_the_same(name, overrides):
    """The same step generator gives the same mix whatever the global RNGs hold; another seed
    gives another."""
    model, (x, y) = _model(), _batch()
    seen = _model_input(model)
    method = _method(name, *overrides)
    results = []
    for seed, global_seed in ((11, 0), (11, 123), (12, 0)):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        out = method(model, x, y, torch.Generator().manual_seed(seed))
        results.append((seen[-1], out.loss))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=resizemix", "method.scale_min=0.9"], r"method\.scale_min \(0\.9\)"),
        (["method.name=resizemix", "method.scale_max=0.05"], r"method\.scale_max \(0\.05\)"),
        (["method.name=resizemix", "method.scale_max=1.5"], r"'method\.scale_max'"),
        (["method.name=resizemix", "method.scale_min=0"], r"'method\.scale_min'"),
        (["method.name=resizemix", "method.interpolation=area"], r"'method\.interpolation'"),
        (["method.name=fmix", "method.decay_power=0"], r"'method\.decay_power'"),
        (["method.name=fmix", "method.alpha=-1"], r"'method\.alpha'"),
        (["method.name=saliencymix", "method.boxes=each"], r"'method\.boxes'"),
        (["method.name=saliencymix", "method.decay_power=3"], r"unknown key 'method\.decay"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_the_defaults_are_the_authors():
    assert _method("saliencymix").settings.alpha == 1.0
    r = _method("resizemix").settings
    assert (r.alpha, r.scale_min, r.scale_max) == (1.0, 0.1, 0.8)
    f = _method("fmix").settings
    assert (f.alpha, f.decay_power) == (1.0, 3.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: saliency_map(torch.zeros(8, 8)), r"one \(C, H, W\) image with C = 1 or 3"),
        (lambda: saliency_map(torch.zeros(4, 8, 8)), r"C = 1 or 3, got shape \(4, 8, 8\)"),
        (lambda: saliency_map(torch.zeros(3, 8, 8, dtype=torch.uint8)), "floating-point"),
        (lambda: saliency_box(torch.zeros(8, 8), 1.5), r"lam must be a number in \[0, 1\]"),
        (lambda: saliency_box(torch.zeros(3, 8, 8), 0.5), r"an \(H, W\) saliency map"),
        (lambda: saliencymix(torch.zeros(3, 8, 8), torch.arange(3), 0.5), "4-D"),
        (lambda: saliencymix(torch.zeros(2, 3, 8, 8), torch.arange(3), 0.5), "length 2"),
        (lambda: resizemix(torch.zeros(2, 3, 8, 8), torch.arange(2), 0.0), r"scale .* \(0, 1\]"),
        (lambda: resizemix(torch.zeros(2, 3, 8, 8), torch.arange(2), 0.5, None, "area"), "'area'"),
        (lambda: fmix_mask(0.5, (8,), 3.0), r"shape must be \(height, width\)"),
        (lambda: fmix_mask(0.5, (8, 8), 0.0), "decay_power must be a number > 0"),
        (lambda: fmix(torch.zeros(3, 8, 8), torch.arange(3), 0.5), "4-D"),
    ],
)
def test_bad_input_is_a_value_error_saying_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
