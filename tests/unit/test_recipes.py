"""The published recipes load through the schema and hold the authors' settings.

References, written out here rather than read back from the recipes: the authors' ImageNet
training as their code and paper give it (SGD Nesterov 0.9, lr 0.1 at batch 1024, weight decay
1e-4, 300 epochs, lr × 0.1 every 75 epochs, RandomResizedCrop 224, flip, jitter 0.4, lighting
0.1), and wsolevaluation's ResNet-50 CAM settings for CUB (clovaai/wsolevaluation: SGD Nesterov
0.9, lr 2.3222617e-4 at batch 32, weight decay 1e-4, 50 epochs, lr × 0.1 every 15 epochs, large
feature map).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.methods import method_names
from pipeline.recipe import load_recipe
from pipeline.training.optim import scaled_lr

REPO = Path(__file__).resolve().parents[2]
IMAGENET_METHODS = (
    "baseline",
    "input_mixup",
    "cutmix",
    "manifold_mixup",
    "puzzlemix",
    "saliencymix",
    "resizemix",
    "fmix",
    "alignmixup",
    "alignmixup_ae",
)
MIXUP_METHODS = ("input_mixup", "manifold_mixup", "alignmixup", "alignmixup_ae")  # α = 2
CUB_METHODS = ("baseline", "cutmix", "alignmixup")
IMAGENET = [f"imagenet_{m}" for m in IMAGENET_METHODS]
CUB = [f"cub_wsol_{m}" for m in CUB_METHODS]
FOLDERS = ("imagenet", "cub_wsol")  # recipes/<folder>/<method>.yaml is named <folder>_<method>
SMALL = ("cifar10", "cifar100", "tinyimagenet")  # the paper's small-data setting


def recipe_path(name: str) -> str:
    """`imagenet_cutmix` → `recipes/imagenet/cutmix.yaml` (relative to the repository)."""
    folder = next(f for f in FOLDERS if name.startswith(f + "_"))
    return f"recipes/{folder}/{name.removeprefix(folder + '_')}.yaml"


def recipe(name: str):
    return load_recipe(REPO / recipe_path(name))


def sbatch_option(name: str, option: str) -> str:
    """The value of `#SBATCH --<option>=...` in slurm/<name>.sh."""
    text = (REPO / "slurm" / f"{name}.sh").read_text()
    found = re.findall(rf"^#SBATCH --{option}=(\S+)$", text, flags=re.M)
    assert len(found) == 1, f"slurm/{name}.sh: expected one #SBATCH --{option}"
    return found[0]


def test_the_published_set_covers_every_method_of_the_paper():
    assert set(IMAGENET_METHODS) <= set(method_names())
    published = {load_recipe(p).name for p in (REPO / "recipes").glob("*/[!_]*.yaml")}
    assert set(IMAGENET) | set(CUB) <= published


@pytest.mark.parametrize("folder", [*FOLDERS, "demo", *SMALL])
def test_recipes_of_a_folder_differ_only_in_name_and_method(folder):
    """Each recipe `extends:` its folder's `_base.yaml` and adds a name (`<folder>_<file>`, the
    run folder slurm/launch.sh derives from the path) and a method; the AE's decoder sizes and
    clipping are the one exception (demo and the small-data sets)."""
    paths = sorted((REPO / "recipes" / folder).glob("[!_]*.yaml"))
    assert len(paths) >= 3
    shared = []
    for path in paths:
        assert path.read_text().count("extends: _base.yaml") == 1, path
        tree = load_recipe(path).model_dump(mode="json")
        assert tree["name"] == f"{folder}_{path.stem}"
        del tree["name"], tree["method"]
        if folder in ("demo", *SMALL):  # the AE's decoder is sized for 32/64 px and clipped
            del tree["model"]["ae"], tree["optim"]["grad_clip"]
        shared.append(tree)
    assert all(tree == shared[0] for tree in shared), folder


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_recipes_hold_the_authors_settings(name):
    r = recipe(name)
    assert r.name == name
    assert r.method.name == name.removeprefix("imagenet_")
    assert (r.model.name, r.model.output_stride, r.model.pretrained) == ("resnet50", 32, None)
    assert r.model.zero_init_last is False  # every BatchNorm weight 1, as the authors' ResNet
    d = r.data
    assert (d.layout, d.train_size, d.flip) == ("imagefolder", 224, True)
    assert tuple(d.crop_area) == (0.08, 1.0)
    assert tuple(d.crop_ratio) == pytest.approx((3 / 4, 4 / 3))
    assert (d.color_jitter, d.lighting) == (0.4, 0.1)
    assert (d.val_resize, d.val_crop) == (256, 224)
    assert tuple(d.mean) == (0.485, 0.456, 0.406) and tuple(d.std) == (0.229, 0.224, 0.225)
    o = r.optim
    assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("authors_sgd", 0.9, True, 1e-4)
    assert (o.lr, o.reference_batch, o.scale_lr) == (0.1, 1024, True)
    assert (o.schedule, list(o.milestones), o.gamma) == ("step", [75, 150, 225], 0.1)
    assert o.warmup_epochs == 0.0
    assert o.label_smoothing == 0.0
    assert r.train.epochs == 300 and r.train.max_steps is None and r.train.resume == "auto"
    assert not r.train.cpu


@pytest.mark.parametrize("name", [f"imagenet_{m}" for m in MIXUP_METHODS])
def test_mixup_methods_draw_lambda_from_beta_2_2(name):
    assert recipe(name).method.alpha == 2.0


@pytest.mark.parametrize("name", [f"imagenet_{m}" for m in ("puzzlemix", "saliencymix", "fmix")])
def test_the_rivals_draw_lambda_from_beta_1_1_as_their_authors(name):
    assert recipe(name).method.alpha == 1.0


def test_alignmixup_uses_the_authors_sinkhorn_and_the_ae_its_clean_fifth():
    for name in ("imagenet_alignmixup", "imagenet_alignmixup_ae"):
        m = recipe(name).method
        assert (m.sinkhorn, m.sinkhorn_eps, m.sinkhorn_max_iter) == ("authors", 0.1, 100)
        assert m.draws == "per_rank"  # their DataParallel run drew per GPU's chunk
    ae = recipe("imagenet_alignmixup_ae").method
    assert ae.clean_prob == 0.2  # the decoder trains on 1/5 of the batches (paper §4)
    assert list(ae.mix_levels) == ["x", "A", "e"]  # the ablation's best setting


def test_manifold_mixup_draws_its_level_as_verma_et_al_and_puzzlemix():
    assert list(recipe("imagenet_manifold_mixup").method.levels) == [0, 1, 2]


@pytest.mark.parametrize("name", IMAGENET)
def test_default_slurm_job_trains_at_the_authors_batch_and_lr(name):
    """8 GPUs × per-GPU batch = 1024, so the linearly scaled lr is the authors' 0.1; 4 nodes
    of 8 GPUs run a global batch of 4096 at lr 0.4."""
    r = recipe(name)
    gpus = int(sbatch_option(name, "gpus-per-node"))
    assert int(sbatch_option(name, "nodes")) == 1
    assert r.data.batch_size * gpus == 1024
    assert scaled_lr(r.optim, r.data.batch_size * gpus) == pytest.approx(0.1)
    assert scaled_lr(r.optim, r.data.batch_size * gpus * 4) == pytest.approx(0.4)


@pytest.mark.parametrize("name", CUB)
def test_cub_recipes_hold_wsolevaluations_resnet50_settings(name):
    r = recipe(name)
    assert r.name == name
    assert r.method.name == name.removeprefix("cub_wsol_")
    assert (r.model.name, r.model.output_stride) == ("resnet50", 16)  # stride 1 in stage 4
    assert r.model.pretrained  # fine-tuned from ImageNet weights
    assert (r.data.layout, r.data.train_size, r.data.flip) == ("cub", 224, True)
    assert (r.data.color_jitter, r.data.lighting) == (0.0, 0.0)
    assert (r.data.val_resize, r.data.val_crop) == (224, 224)
    o = r.optim
    assert (o.momentum, o.nesterov, o.weight_decay) == (0.9, True, 1e-4)
    assert (o.lr, o.reference_batch) == (2.3222617e-4, 32)
    assert (o.schedule, list(o.milestones), o.gamma) == ("step", [15, 30, 45], 0.1)
    assert r.train.epochs == 50
    gpus = int(sbatch_option(name, "gpus-per-node"))
    assert r.data.batch_size * gpus == 32  # the default job trains at wsolevaluation's batch
    if r.method.name == "alignmixup":
        assert r.method.alpha == 2.0
    if r.method.name == "cutmix":
        assert r.method.alpha == 1.0  # wsolevaluation's cutmix_beta


@pytest.mark.parametrize("name", IMAGENET + CUB)
def test_each_slurm_script_runs_its_recipe_with_requeue_on_the_time_limit(name):
    text = (REPO / "slurm" / f"{name}.sh").read_text()
    assert f"export RECIPE={recipe_path(name)}" in text
    assert re.search(r'^exec bash "\$root/slurm/launch.sh" "\$@"$', text, flags=re.M)
    assert sbatch_option(name, "job-name") == name
    assert sbatch_option(name, "ntasks-per-node") == "1"
    assert re.fullmatch(r"B:USR1@\d+", sbatch_option(name, "signal"))
    assert sbatch_option(name, "open-mode") == "append"
    assert re.search(r"^#SBATCH --requeue$", text, flags=re.M)


def test_puzzlemix_measures_seams_with_the_data_std_of_its_recipe():
    """The run tells every method its data's normalisation: PuzzleMix's seams (in pixel units)
    use each published recipe's own `data.std`."""
    from pipeline.methods import build_method
    from pipeline.training.build import method_context

    paths = [p for p in (REPO / "recipes").glob("*/[!_]*.yaml") if "puzzlemix" in p.stem]
    assert len(paths) == 2
    for path in paths:
        r = load_recipe(path)
        method = build_method(r.method, method_context(r, rank=0))
        assert method.options.pixel_std == pytest.approx(tuple(r.data.std)), path
