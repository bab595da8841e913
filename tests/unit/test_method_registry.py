"""One table over every registered method: a real training step (the trainer's `train_step`
under Accelerate) has a finite loss, reaches the backbone, repeats exactly for the same
(seed, step), leaves only the declared parameters without gradient, and the method survives a
model file. Then: a method registered by this file alone trains, and bad method settings are
errors that name the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import Field

from pipeline.errors import RecipeError
from pipeline.methods import Method, MethodOutput, MixSettings, build_method, register_method
from pipeline.methods import registry as registry_module
from pipeline.methods.registry import method_class, method_names
from pipeline.mixing import input_mixup, mixed_cross_entropy, sample_mix
from pipeline.recipe import load_recipe
from pipeline.runs.checkpoints import TrainerState
from pipeline.runs.model_file import load_model, model_facts, save_final_model
from pipeline.training.optim import build_optimizer
from pipeline.training.step import MethodRunner, step_generator, train_step

K, B, STEPS = 5, 8, 6
TINY_MODEL = [
    "model.name=test_resnet",
    "model.output_stride=8",
    "model.channels_last=false",
    "model.ae.embed_channels=16",
    "model.ae.decoder_width=16",
    "model.ae.decoder_min_width=8",
    "model.ae.decoder_blocks=1",
]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True, mixed_precision="no")


# Ablation switches (the paper's Table 6) that change the model or the code path, as rows of
# the same table: f alone on AlignMixup (vector e, tensor E), unaligned mixing, the VAE.
VARIANTS = {
    "alignmixup-x_A_e": (
        "alignmixup",
        "method.mix_levels=[x,A,e]",
        "model.ae.embedding=vector",
        "model.ae.grid=4",
    ),
    "alignmixup-x_A_E-unaligned": (
        "alignmixup",
        "method.mix_levels=[x,A,E]",
        "method.align=false",
        "model.ae.embedding=tensor",
    ),
    "vae-x_A_e": ("alignmixup_ae", "model.ae.variational=true"),
    "vae-x_E": (
        "alignmixup_ae",
        "model.ae.variational=true",
        "model.ae.embedding=tensor",
        "method.mix_levels=[x,E]",
        "method.clean_prob=0.5",
    ),
}
ROWS = [pytest.param((name,), id=name) for name in method_names()] + [
    pytest.param(row, id=key) for key, row in VARIANTS.items()
]


def _recipe(name: str, *extra: str):
    return load_recipe(None, [f"method.name={name}", *TINY_MODEL, *extra])


def _run(accelerator, recipe, steps: int = STEPS):
    """Train a fresh model (seed 0) for `steps`; → (model, losses, params without a gradient
    in at least one step, every parameter name)."""
    torch.manual_seed(0)
    method = build_method(recipe.method)
    model = method.build_model(recipe.model, K)
    names = {p: n for n, p in model.named_parameters()}
    got: list[set[str]] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: got[-1].add(names[p]))
    runner, optimizer = accelerator.prepare(
        MethodRunner(model, method), build_optimizer(recipe.optim, model, lr=0.01)
    )
    data = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=data)
    labels = torch.randint(0, K, (B,), generator=data)
    losses = []
    for step in range(steps):
        # Global RNGs move between steps: a method must not read them.
        np.random.seed(100 + step)
        torch.manual_seed(100 + step)
        got.append(set())
        out = train_step(accelerator, runner, optimizer, images, labels, step_generator(0, step))
        losses.append(out.loss.item())
    missing = set().union(*(set(names.values()) - g for g in got))
    return model, losses, missing, set(names.values())


@pytest.mark.parametrize("row", ROWS)
def test_every_method_trains_a_real_step(row, accelerator, one_torch_thread):
    recipe = _recipe(*row)
    _, losses, missing, names = _run(accelerator, recipe)
    assert all(np.isfinite(losses)), losses
    assert any(n.startswith("stages.0.") for n in names - missing)  # gradients reach the stem
    declared = method_class(recipe.method.name).needs(recipe.method).unused_parameters
    assert all(n.startswith(declared) for n in missing) if declared else not missing, missing
    # the same (seed, step) gives the same loss, with other values in the global RNGs
    _, again, _, _ = _run(accelerator, recipe)
    assert again == losses


@pytest.mark.parametrize("row", ROWS)
def test_every_method_round_trips_through_a_model_file(row, accelerator, tmp_path):
    recipe = _recipe(*row)
    model, _, _, _ = _run(accelerator, recipe, steps=1)
    path = tmp_path / "model.safetensors"
    save_final_model(path, model, recipe, model_facts(model, K, list("abcde")), TrainerState())
    loaded, loaded_recipe, facts = load_model(path)
    assert loaded_recipe == recipe and type(loaded_recipe.method) is type(recipe.method)
    needs = method_class(recipe.method.name).needs(recipe.method)
    assert facts["has_decoder"] == needs.decoder
    assert facts["has_embedding"] == (needs.decoder or needs.embedding)
    assert facts["class_names"] == list("abcde")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_a_channels_last_model_is_saved_and_loads_back(tmp_path):
    # The ImageNet recipes train channels-last; safetensors refuses non-contiguous tensors.
    recipe = _recipe("baseline")
    model = build_method(recipe.method).build_model(recipe.model, K)
    model = model.to(memory_format=torch.channels_last)
    path = tmp_path / "model.safetensors"
    save_final_model(path, model, recipe, model_facts(model, K, list("abcde")), TrainerState())
    loaded, _, _ = load_model(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_unused_parameters_are_declared_only_where_some_go_without_gradient(accelerator):
    """The AE's decoder is its only declared-unused part, and it does go without gradient."""
    needs = {n: method_class(n).needs(_recipe(n).method) for n in method_names()}
    declared = {n: need.unused_parameters for n, need in needs.items()}
    assert {n for n, d in declared.items() if d} == {"alignmixup_ae"}
    _, _, missing, _ = _run(accelerator, _recipe("alignmixup_ae", "method.clean_prob=0"), 2)
    assert missing and all(n.startswith("decoder.") for n in missing)


# --- a method added by one file ------------------------------------------------------------


class TwiceMixedSettings(MixSettings):
    rounds: int = Field(2, ge=1, description="how many times the batch is mixed")


@pytest.fixture
def twice_mixed():
    """A method defined and registered here and nowhere else: input mixup applied `rounds`
    times with fresh partners, labels mixed by the product of the λs."""

    @register_method("test_twice_mixed")
    class TwiceMixed(Method):
        Settings = TwiceMixedSettings

        def __call__(self, model, images, labels, rng):
            s = sample_mix(images.shape[0], self.settings.alpha, images.device, generator=rng)
            mixed = input_mixup(images, s.perm, s.lam)
            for _ in range(self.settings.rounds - 1):
                mixed = input_mixup(mixed, torch.arange(images.shape[0]), 1.0)
            logits = model(mixed)
            loss = mixed_cross_entropy(logits, labels, s.perm, s.lam)
            return MethodOutput(loss, logits, {"rounds": torch.tensor(self.settings.rounds)})

    yield TwiceMixed
    registry_module._METHODS.pop("test_twice_mixed")


@pytest.mark.slow
def test_a_method_registered_in_a_test_file_trains(twice_mixed, tiny_overrides, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.training import Trainer

    recipe = load_recipe(
        None,
        tiny_overrides(
            "name=twice",
            "method.name=test_twice_mixed",
            "method.rounds=3",
            "train.max_steps=2",
            "tracking.experiment=t_registry",
        ),
    )
    assert isinstance(recipe.method, TwiceMixedSettings) and recipe.method.rounds == 3
    summary = Trainer(recipe).fit()
    assert summary.steps == 2 and summary.method == "test_twice_mixed"
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(summary.mlflow_run_id)
    assert run.data.params["method.rounds"] == "3"
    assert {k for k in run.data.params if k.startswith("method.")} == {
        "method.name",
        "method.alpha",
        "method.draws",
        "method.rounds",
    }
    assert run.data.metrics["method/rounds"] == 3.0
    assert "test_twice_mixed" in method_names()


@pytest.fixture
def split_mix():
    """A pair-mixing method written here in a few lines: the columns from round(λ·W) on come
    from the partner, and λ becomes the share of columns kept."""
    from pipeline.methods import Mixed, PairMix

    @register_method("test_split_mix")
    class SplitMix(PairMix):
        def mix_images(self, images, s, choices):
            cut = round(s.lam * images.shape[-1])
            mixed = images.clone()
            mixed[..., cut:] = images[s.perm][..., cut:]
            return Mixed(mixed, cut / images.shape[-1], {"cut": torch.tensor(float(cut))})

    yield SplitMix
    registry_module._METHODS.pop("test_split_mix")


def test_a_pair_mixing_method_is_a_few_lines_and_gets_the_pair_loss(split_mix, accelerator):
    import inspect

    import torch.nn.functional as F

    assert len(inspect.getsource(split_mix).splitlines()) <= 25
    recipe = _recipe("test_split_mix", "method.alpha=0.7", "optim.label_smoothing=0.1")
    assert {"alpha", "draws"} <= set(type(recipe.method).model_fields)  # the pair-mix settings
    _, losses, _, _ = _run(accelerator, recipe)
    assert all(np.isfinite(losses)), losses

    # One step by hand: λ and π as the pair-mix base draws them (λ, then π, from the step's
    # generator under draws: global), the mix written out, CE from torch itself.
    from pipeline.methods.base import MethodContext

    torch.manual_seed(0)
    method = build_method(recipe.method, MethodContext(label_smoothing=0.1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, K))  # far
    g = torch.Generator().manual_seed(3)  # from uniform logits, so CE(y) and CE(y[π]) differ
    x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, K, (B,), generator=g)
    with torch.no_grad():
        out = method(model, x, y, step_generator(0, 5))
        s = sample_mix(B, 0.7, "cpu", step_generator(0, 5))
        cut = round(s.lam * 32)
        by_hand = torch.cat([x[..., :cut], x[s.perm][..., cut:]], dim=-1)
        logits = model(by_hand)
    kept = cut / 32
    expected = kept * F.cross_entropy(logits, y, label_smoothing=0.1) + (
        1 - kept
    ) * F.cross_entropy(logits, y[s.perm], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    assert out.stats["lam"].item() == pytest.approx(kept) and out.stats["cut"].item() == cut


def test_a_name_is_registered_once(twice_mixed):
    with pytest.raises(ValueError, match="already registered"):
        register_method("test_twice_mixed")(type("Other", (Method,), {}))


# --- recipe errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.clean_prob=0.3"], r"unknown key 'method\.clean_prob'"),  # an AE key on baseline
        (["method.name=cutmix", "method.sinkhorn=authors"], r"unknown key 'method\.sinkhorn'"),
        (["method.name=manifold_mixup", "method.manifold_levels=[1]"], "method.manifold_levels"),
        (["method.name=stylemix"], r"'method\.name': unknown method 'stylemix'; registered: "),
        (["method.name=manifold_mixup", "method.levels=[]"], r"'method\.levels'"),
        (
            ["method.name=manifold_mixup", "method.levels=[0,-1]"],
            r"'method\.levels\.1'.*equal to 0",
        ),
        (["method.name=alignmixup", "method.draws=per_gpu"], r"'method\.draws'"),
        (["model.zero_init_last=maybe"], r"'model\.zero_init_last'"),
    ],
)
def test_bad_method_settings_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_a_manifold_level_the_model_lacks_is_an_error():
    recipe = _recipe("manifold_mixup", "method.levels=[0,9]")
    method = build_method(recipe.method)
    with pytest.raises(RecipeError, match=r"method\.levels: \[9\] not among .* levels 0\.\.4"):
        method.build_model(recipe.model, K)
    at_a = _recipe("manifold_mixup", "method.levels=[4]")  # level 4 is A: a level like others
    assert build_method(at_a.method).build_model(at_a.model, K).num_levels == 4


def test_manifold_mixup_refuses_a_model_that_runs_as_one_stage():
    recipe = _recipe("manifold_mixup", "model.name=vit_tiny_patch16_224", "model.output_stride=32")
    with pytest.raises(RecipeError, match=r"model\.name: 'vit_tiny_patch16_224' runs as a single"):
        build_method(recipe.method).build_model(recipe.model, K)


def test_zero_init_last_reaches_timm_and_model_keys_timm_lacks_are_named():
    def last_bn_weights(*overrides):
        recipe = _recipe("baseline", *overrides)
        model = build_method(recipe.method).build_model(recipe.model, K)
        return [
            block.bn2.weight
            for stage in model.stages
            for block in stage.modules()
            if type(block).__name__ == "BasicBlock"
        ]

    # timm zeroes the last BatchNorm of every residual branch; the authors' ResNet sets all to 1
    assert all((w == 0).all() for w in last_bn_weights())
    assert all((w == 1).all() for w in last_bn_weights("model.zero_init_last=false"))
    vit = ["model.name=vit_tiny_patch16_224", "model.output_stride=32"]
    for key, value in (("zero_init_last", "false"), ("output_stride", "16")):
        bad = _recipe("baseline", *vit, f"model.{key}={value}")
        with pytest.raises(RecipeError, match=rf"model\.{key}: timm model 'vit_tiny"):
            build_method(bad.method).build_model(bad.model, K)


def test_the_method_name_cannot_be_reassigned():
    recipe = _recipe("alignmixup")
    with pytest.raises(ValueError, match="frozen"):
        recipe.method.name = "baseline"
