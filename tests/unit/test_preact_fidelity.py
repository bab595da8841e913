"""PreAct ResNet-18 against the authors' network, written out below from its formula (their
`cifar10_100/models/resnet.py` read, not imported), and the architecture version that keeps
weights of the earlier, different block from loading silently.

The authors' block: `out = relu(bn1(x))`; `shortcut = conv1x1(out)` when the shape changes,
else `out` itself (their `nn.Sequential()` applied to `out`); `out = conv2(relu(bn2(conv1(out))))
+ shortcut`. The classifier: average pooling of the 4×4 (32 px) or 8×8 (64 px) map, a linear layer.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.errors import CheckpointError
from pipeline.models import build_model, count_parameters
from pipeline.runs.model_file import read_weights

STRIDES = (1, 2, 2, 2)


def authors_preact18(sd: dict[str, torch.Tensor], x: torch.Tensor, training: bool):
    """(A, logits) of the authors' PreAct ResNet-18 with the weights `sd` (this project's
    parameter names). `training`: BatchNorm on batch statistics, as in their train mode."""

    def bn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(
            h,
            sd[f"{name}.running_mean"].clone(),
            sd[f"{name}.running_var"].clone(),
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            training=training,
        )

    out = F.relu(bn(F.conv2d(x, sd["stem.0.weight"], padding=1), "stem.1"))
    for stage, first_stride in enumerate(STRIDES):
        for block in range(2):
            p, stride = f"stages.{stage}.{block}", first_stride if block == 0 else 1
            pre = F.relu(bn(out, f"{p}.bn1"))
            if f"{p}.shortcut.weight" in sd:
                shortcut = F.conv2d(pre, sd[f"{p}.shortcut.weight"], stride=stride)
            else:
                shortcut = pre  # the authors' empty nn.Sequential() on relu(bn1(x))
            h = F.conv2d(pre, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.conv2d(F.relu(bn(h, f"{p}.bn2")), sd[f"{p}.conv2.weight"], padding=1)
            out = h + shortcut
    pooled = F.avg_pool2d(out, out.shape[-1]).flatten(1)
    return out, F.linear(pooled, sd["head.weight"], sd["head.bias"])


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN statistic random, so no layer is an identity by initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and t.ndim == 1):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize(("side", "grid"), [(32, 4), (64, 8)])
@pytest.mark.parametrize("training", [False, True])
def test_preactresnet18_computes_the_authors_network(side, grid, training):
    model = _randomised(timm.create_model("preactresnet18", num_classes=100)).train(training)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, logits = model.forward_features(x), model(x)
        a_ref, logits_ref = authors_preact18(sd, x, training)
    assert a.shape == a_ref.shape == (4, 512, grid, grid)
    scale = logits_ref.abs().max()
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5 * a_ref.abs().max())
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5 * scale)


def test_the_training_model_reaches_the_authors_A():
    """The MixNet the methods mix in: its A (features) is the authors' layer4 output."""
    model = build_model(ModelConfig(name="preactresnet18"), 10).eval()
    backbone = timm.create_model("preactresnet18", num_classes=10)
    _randomised(backbone)
    own = model.state_dict()
    # MixNet keeps the timm stem and stages as its own levels: copy the matching tensors by shape
    # and order, the one mapping that does not depend on how the levels are named.
    src = [v for k, v in backbone.state_dict().items() if not k.startswith("head.")]
    dst = [k for k in own if not k.startswith("classifier.")]
    assert [own[k].shape for k in dst] == [v.shape for v in src]
    model.load_state_dict({**own, **dict(zip(dst, src, strict=True))})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a_ref, _ = authors_preact18(backbone.state_dict(), x, training=False)
        torch.testing.assert_close(model.features(x), a_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("classes", "count"), [(100, 11_217_444), (200, 11_268_744)])
def test_parameter_counts_stay_the_authors(classes, count):
    assert count_parameters(build_model(ModelConfig(name="preactresnet18"), classes)) == count


def _model_file(tmp_path, version: int | None):
    """A small model file as the pipeline writes it, its architecture version set (None: the
    entry removed, as in files written before versions were recorded)."""
    from pipeline.recipe import load_recipe
    from pipeline.runs.checkpoints import TrainerState
    from pipeline.runs.model_file import model_facts, save_final_model

    recipe = load_recipe(None, ["model.name=preactresnet18", "method.name=baseline"])
    model = build_model(recipe.model, 10)
    path = tmp_path / "model_final.safetensors"
    facts = model_facts(model, 10, list("abcdefghij"))
    save_final_model(path, model, recipe, facts, TrainerState())
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        names = fh.keys()
        weights = {k: fh.get_tensor(k) for k in names}
    header = json.loads(meta["alignmixup_pipeline"])
    assert header["architecture_version"] == 2
    header.pop("architecture_version")
    if version is not None:
        header["architecture_version"] = version
    save_file(weights, str(path), metadata={"alignmixup_pipeline": json.dumps(header)})
    return path


def test_model_files_of_the_old_block_are_refused_with_the_reason(tmp_path):
    for version in (None, 1):
        with pytest.raises(CheckpointError) as err:
            read_weights(_model_file(tmp_path, version))
        text = str(err.value)
        assert "model_final.safetensors" in text and "version 1" in text
        assert "relu(bn1(x))" in text
    read_weights(_model_file(tmp_path, 2))  # the current version loads


def test_a_checkpoint_of_the_old_block_is_refused_on_resume_and_load(tiny_overrides):
    """A run folder whose checkpoint predates the version (its model_meta.json without one, as
    every checkpoint written with the old block) stops the resume with a named error."""
    from pipeline.recipe import load_recipe
    from pipeline.runs.checkpoints import META_FILE, latest_checkpoint
    from pipeline.training import Trainer

    overrides = tiny_overrides(
        "model.name=preactresnet18", "train.max_steps=1", "tracking.enabled=false"
    )
    Trainer(load_recipe(None, overrides)).fit()
    folder = latest_checkpoint(load_recipe(None, overrides).train.output_dir)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta.pop("architecture_version") == 2
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 1") as err:
        Trainer(load_recipe(None, [*overrides, "train.max_steps=2"])).fit()
    assert str(folder) in str(err.value)
    with pytest.raises(CheckpointError, match=r"relu\(bn1\(x\)\)"):
        read_weights(folder)
