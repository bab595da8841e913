"""What only a CUDA device can check (`pytest -m gpu`, run by `make gpu-check`): DALI `mixed`
decode against the CPU decode, every method's training step under bf16 and fp16 (GradScaler),
channels-last and torch.compile, the AlignMix solver, attacks and CAMs against the CPU, and a
train → checkpoint → resume with the DALI `mixed` loader. Skipped, saying why, without CUDA.

Written to need only torch, timm, accelerate, torchmetrics, DALI, pydantic, PyYAML, safetensors
and imagesize (what `requirements-gpu.txt` adds to a cluster's PyTorch): no MLflow (tracking is
off), no scikit-learn, no POT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.methods import method_names
from tests.photos import synthetic_photo

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
METHODS = method_names()  # every registered method
SMALL_MODEL = [
    "model.name=resnet18",
    "model.ae.embed_channels=64",
    "model.ae.decoder_width=64",
    "model.ae.decoder_min_width=16",
    "model.ae.decoder_blocks=1",
]


# --- DALI `mixed` decode ---------------------------------------------------------------------


def _jpeg_variants(folder: Path) -> list[Path]:
    """Baseline RGB, progressive, grayscale, CMYK and EXIF-rotated JPEGs, two classes."""
    paths = []
    for i in range(8):
        cls = folder / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        img, path = synthetic_photo(i), cls / f"img{i}.jpg"
        kind = ["rgb", "progressive", "gray", "cmyk", "exif"][i % 5]
        if kind == "rgb":
            img.save(path, quality=90)
        elif kind == "progressive":
            img.save(path, quality=90, progressive=True)
        elif kind == "gray":
            img.convert("L").save(path, quality=90)
        elif kind == "cmyk":
            img.convert("CMYK").save(path, quality=90)
        else:
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
            img.save(path, quality=90, exif=exif)
        paths.append(path)
    return paths


def test_dali_mixed_decode_matches_the_cpu_decode(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    root = tmp_path / "jpegs"
    for split in ("train", "val"):
        _jpeg_variants(root / split)
    cfg = DataConfig(
        backend="dali", root=str(root), batch_size=4, num_threads=2, val_resize=64, val_crop=64
    )
    batches = {}
    for device in ("cpu", "cuda"):
        loaders = build_loaders(cfg, 0, 1, device, seed=0)
        batches[device] = [images.float().cpu() for images, _ in loaders.val]
    std = torch.tensor(cfg.std)[:, None, None] * 255
    for cpu, gpu in zip(batches["cpu"], batches["cuda"], strict=True):
        levels = ((cpu - gpu) * std).abs()  # grey levels of [0, 255]
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two.
        assert levels.mean() < 1.5, levels.mean()
        assert torch.quantile(levels.flatten(), 0.999) < 12


# --- one training step of every method -------------------------------------------------------


def _accelerator(amp: str):
    """An Accelerator for `amp`; Accelerate's state is per process, so reset it first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=amp)


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 64, 64, generator=g)
    return x.to(CUDA), torch.randint(10, (16,), generator=g).to(CUDA)


def _logits(method_name: str, amp: str, channels_last: bool, seed: int = 3):
    """Logits and loss of one method call under `amp` on a fixed model, batch and draw."""
    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe
    from pipeline.training.step import step_generator

    recipe = load_recipe(None, [f"method.name={method_name}", *SMALL_MODEL])
    method = build_method(recipe.method)
    torch.manual_seed(0)
    model = method.build_model(recipe.model, 10).to(CUDA)
    x, y = _batch()
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=bool(dtype)):
        out = method(model, x, y, step_generator(0, seed))
    return out.logits.float(), out.loss.float()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method_name", METHODS)
def test_every_method_under_amp_is_finite_and_close_to_float32(method_name, amp, channels_last):
    reference, _ = _logits(method_name, "no", channels_last=False)
    logits, loss = _logits(method_name, amp, channels_last)
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    if method_name == "puzzlemix":
        # Its mask is a discrete function (graph cut, transport) of a saliency computed under
        # autocast: a block can flip between precisions, so the logits are not comparable.
        return
    relative = ((logits - reference).norm() / reference.norm()).item()
    # bf16 keeps 8 bits of mantissa, fp16 11; the authors' plan can jump under bf16
    # (docs/mixing.md), which moves the aligned logits more than the rounding alone.
    assert relative < {"bf16": 0.1, "fp16": 0.02}[amp], relative


@pytest.mark.parametrize(
    ("amp", "compiled"), [("bf16", False), ("fp16", False), ("bf16", True)], ids=str
)
@pytest.mark.parametrize("method_name", ["baseline", "alignmixup", "alignmixup_ae"])
def test_train_step_under_amp_with_channels_last_and_compile(method_name, amp, compiled):
    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import MethodRunner, StepSettings, step_generator, train_step

    recipe = load_recipe(None, [f"method.name={method_name}", *SMALL_MODEL])
    method = build_method(recipe.method)
    torch.manual_seed(0)
    model = method.build_model(recipe.model, 10).to(memory_format=torch.channels_last)
    runner = MethodRunner(model, method)
    if compiled:
        model.compile_parts()  # what model.compile: true does (Inductor on CUDA)
    accelerator = _accelerator(amp)
    runner, optimizer = accelerator.prepare(runner, build_optimizer(recipe.optim, model, lr=1e-3))
    x, y = _batch()
    settings = StepSettings(grad_clip=5.0, channels_last=True)
    losses = [
        train_step(accelerator, runner, optimizer, x, y, step_generator(0, s), settings).loss
        for s in range(3)
    ]
    assert all(torch.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- the AlignMix solver ---------------------------------------------------------------------


def _train_like_features(batch: int = 32) -> torch.Tensor:
    """ReLU of Gaussians, c = 2048 on 7 × 7: pairwise costs ≈ 1,400, like train-mode ResNet-50."""
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(batch, 2048, 7, 7, generator=g) * 0.9)


@pytest.mark.parametrize("mode", ["authors", "converged"])
def test_sinkhorn_and_align_mix_on_cuda_match_the_cpu(mode):
    from pipeline.mixing import SinkhornOptions, align_mix, sinkhorn, squared_cost

    a = _train_like_features()
    partner = a.roll(1, 0)
    flat, flat_partner = (t.flatten(2).transpose(1, 2) for t in (a, partner))
    cost = squared_cost(flat, flat_partner)  # one cost for both devices: the solver alone
    cpu = sinkhorn(cost, SinkhornOptions(mode=mode))
    for host_checks in (True, False):
        gpu = sinkhorn(cost.to(CUDA), SinkhornOptions(mode=mode, host_checks=host_checks))
        assert int(gpu.iterations) == int(cpu.iterations)
        torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, rtol=1e-4, atol=1e-7)
    mixed_cpu = align_mix(a, partner, 0.3, 1, SinkhornOptions(mode=mode))
    mixed_gpu = align_mix(a.to(CUDA), partner.to(CUDA), 0.3, 1, SinkhornOptions(mode=mode)).cpu()
    # Different matmul rounding in the cost moves the authors' near-hard plan a little.
    assert ((mixed_gpu - mixed_cpu).norm() / mixed_cpu.norm()).item() < 1e-2


def test_authors_mode_on_cuda_never_syncs_the_host():
    from pipeline.mixing import align_mix

    a = _train_like_features().to(CUDA)
    align_mix(a, a.roll(1, 0), 0.3, 0)  # warm-up: allocations and kernels load outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        align_mix(a, a.roll(1, 0), 0.3, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", ["authors", "converged"])
@pytest.mark.parametrize("shape", [(128, 49, 49), (64, 16, 16), (32, 64, 64), (8, 7, 12)], ids=str)
def test_fused_solver_on_cuda_matches_the_eager_loop(mode, shape):
    """The compiled Triton kernels (the interpreter's run is in test_sinkhorn_triton.py)."""
    from pipeline.mixing import SinkhornOptions, sinkhorn, squared_cost

    g = torch.Generator().manual_seed(1)
    batch, r, s = shape
    a = torch.relu(torch.randn(batch, r, 512, generator=g)).to(CUDA)
    b = torch.relu(torch.randn(batch, s, 512, generator=g)).to(CUDA)
    cost = squared_cost(a, b)
    eager = sinkhorn(cost, SinkhornOptions(mode=mode, backend="eager", host_checks=False))
    fused = sinkhorn(cost, SinkhornOptions(mode=mode, backend="triton"))
    assert int(fused.iterations) == int(eager.iterations)
    scale = eager.plan.abs().max()
    torch.testing.assert_close(fused.plan, eager.plan, rtol=1e-5, atol=1e-5 * scale)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sinkhorn(cost, SinkhornOptions(mode=mode, backend="triton"))  # no host sync in either mode
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _no_sync_steps(loader, method_name: str, steps: int = 3) -> None:
    """`steps` batches of `loader` through an aligned bf16 train step, and a validation update,
    with torch's sync debug mode set to raise at any host-device sync (after a warm-up step)."""
    from pipeline.evaluation.metrics import TopKErrors
    from pipeline.methods import build_method
    from pipeline.recipe import load_recipe
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import MethodRunner, step_generator, train_step

    recipe = load_recipe(None, [f"method.name={method_name}", "method.mix_levels=[A]",
                                *SMALL_MODEL])  # fmt: skip
    method = build_method(recipe.method)
    model = method.build_model(recipe.model, 10).to(CUDA)
    accelerator = _accelerator("bf16")
    runner, optimizer = accelerator.prepare(
        MethodRunner(model, method), build_optimizer(recipe.optim, model, lr=1e-3)
    )
    batches = iter(loader)
    x, y = next(batches)
    train_step(accelerator, runner, optimizer, x, y, step_generator(0, 0))  # warm-up
    errors = TopKErrors(10, (1, 5), CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s, (x, y) in zip(range(1, steps + 1), batches, strict=False):
            train_step(accelerator, runner, optimizer, x, y, step_generator(0, s))
            errors.update(model(x).float(), y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_in_memory_loader_step_and_validation_never_sync():
    import numpy as np

    from pipeline.config import DataConfig
    from pipeline.data.memory import ArraySplit, MemoryLoader

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 256).astype(np.int64)
    split = ArraySplit(images, labels, list("abcdefghij"), "synthetic")
    cfg = DataConfig(layout="cifar10", batch_size=32, train_size=32, val_resize=32, val_crop=32)
    loader = MemoryLoader(split, cfg, train=True, batch_size=32, rank=0, world_size=1, seed=0,
                          device=CUDA)  # fmt: skip
    _no_sync_steps(loader, "alignmixup")


def test_dali_mixed_loader_step_and_validation_never_sync(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data import build_loaders

    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(64):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_photo(i, (48, 48)).save(folder / f"{i}.jpg", quality=90)
    cfg = DataConfig(backend="dali", root=str(root), batch_size=16, num_threads=2, train_size=32,
                     val_resize=32, val_crop=32)  # fmt: skip
    _no_sync_steps(build_loaders(cfg, 0, 1, CUDA, seed=0).train, "alignmixup")


# --- evaluation on CUDA ----------------------------------------------------------------------


def _eval_model():
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(name="resnet18"), 10).eval()


def test_fgsm_pgd_and_cams_on_cuda_match_the_cpu():
    from pipeline.evaluation.attacks import fgsm, pgd, pixel_model
    from pipeline.evaluation.wsol import class_activation_maps

    model = _eval_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 64, 64, generator=g), torch.randint(10, (8,), generator=g)
    net = pixel_model(model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    net_gpu = pixel_model(_eval_model().to(CUDA), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for attack in (
        lambda n, a, b: fgsm(n, a, b),
        lambda n, a, b: pgd(n, a, b, random_start=False, iterations=5),
    ):
        cpu, gpu = attack(net, x, y), attack(net_gpu, x.to(CUDA), y.to(CUDA)).cpu()
        # a gradient's sign can flip where it is ~0: a few pixels may differ by 2ε
        assert (cpu != gpu).float().mean() < 1e-3
    logits, cams = class_activation_maps(model, x)
    logits_gpu, cams_gpu = class_activation_maps(_eval_model().to(CUDA), x.to(CUDA))
    torch.testing.assert_close(logits_gpu.cpu(), logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cams_gpu.cpu(), cams, rtol=1e-3, atol=1e-3)


# --- train, checkpoint, resume with DALI `mixed` ---------------------------------------------


def test_train_checkpoint_resume_on_cuda_with_dali_mixed(tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runs.checkpoints import list_checkpoints, read_state
    from pipeline.training import Trainer
    from pipeline.training.preempt import STOP_FILE

    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(32):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_photo(100 + i, (40, 40)).save(folder / f"{i}.jpg", quality=90)
    overrides = [
        "method.name=alignmixup",
        "model.name=resnet18",
        "data.backend=dali",
        f"data.root={root}",
        "data.batch_size=8",
        "data.train_size=32",
        "data.val_resize=32",
        "data.val_crop=32",
        "optim.reference_batch=8",
        "train.amp=bf16",
        "train.cpu=false",
        "train.progress=false",
        "train.checkpoint_every=2",
        "train.preempt_check_every=2",
        "train.max_steps=6",
        f"train.output_dir={tmp_path / 'run'}",
        "tracking.enabled=false",
    ]
    out = tmp_path / "run"
    out.mkdir()
    (out / STOP_FILE).touch()  # preempted at the first check, as Slurm's USR1 does
    first = Trainer(load_recipe(None, overrides)).fit()
    assert first.preempted and first.steps == 2
    assert read_state(list_checkpoints(out)[-1]).step == 2
    resumed = Trainer(load_recipe(None, overrides)).fit()
    assert not resumed.preempted and resumed.steps == 6 and resumed.top1_err is not None
