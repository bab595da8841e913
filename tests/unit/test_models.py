"""Models: parameter counts against the paper, levels, the AE's shapes, other timm backbones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import AEConfig, ModelConfig
from pipeline.errors import RecipeError
from pipeline.models import build_model, count_parameters


def test_resnet50_has_25_6m_parameters():
    # torchvision/timm ResNet-50 at 1,000 classes: 25,557,032 parameters (paper: 25.6M).
    model = build_model(ModelConfig(name="resnet50"), 1000)
    assert count_parameters(model) == 25_557_032


def test_alignmixup_ae_has_35m_parameters():
    model = build_model(ModelConfig(name="resnet50"), 1000, autoencoder=True)
    assert abs(count_parameters(model) - 35e6) <= 1e6
    decoder = sum(p.numel() for p in model.decoder.parameters())
    extra = count_parameters(model) - 25_557_032
    assert decoder > extra / 2  # "the extra 40% mostly a residual decoder" (the paper, §4)


def test_levels_compose_to_the_full_forward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="test_resnet"), 10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.num_levels == 4
    h2 = model.forward_levels(x, 0, 2)
    a = model.forward_levels(h2, 2, model.num_levels)
    torch.testing.assert_close(model.head(a), model(x))
    assert a.shape[-2:] == (2, 2)  # stride 32


def test_output_stride_16_doubles_the_map():
    model = build_model(ModelConfig(name="test_resnet", output_stride=16), 10)
    assert model.features(torch.randn(1, 3, 64, 64)).shape[-2:] == (4, 4)


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_ae_decodes_to_input_size_and_classifies_from_e(size):
    cfg = ModelConfig(
        name="test_resnet",
        ae=AEConfig(embed_channels=32, decoder_width=32, decoder_min_width=8, decoder_blocks=1),
    )
    model = build_model(cfg, 10, autoencoder=True).eval()
    x = torch.randn(2, 3, *size)
    a = model.features(x)
    e = model.embed(a)
    assert e.shape[1] == 32 and e.shape[-2:] == a.shape[-2:]
    assert model.decode(e).shape == x.shape
    torch.testing.assert_close(model(x), model.classify(e))
    assert model.classifier.in_features == 32


def test_vit_tokens_become_a_grid():
    model = build_model(ModelConfig(name="test_vit"), 10)
    a = model.features(torch.randn(2, 3, 32, 32))
    assert a.ndim == 4 and a.shape[-1] == a.shape[-2]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_names_the_key():
    with pytest.raises(RecipeError, match=r"model\.name.*no_such_net"):
        build_model(ModelConfig(name="no_such_net"), 10)


# --- timm's pretrained weights, offline ------------------------------------------------------


def test_timm_pretrained_from_a_local_file_reproduces_its_weights(tmp_path):
    import timm

    from pipeline.recipe import load_recipe

    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    recipe = load_recipe(
        None, ["model.name=resnet18", f"model.timm_pretrained={tmp_path / 'resnet18.pth'}"]
    )
    model = build_model(recipe.model, 10)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    # the stages hold timm's own modules in timm's order: stem and layer1, layer2, ...
    got = {k: v for k, v in model.state_dict().items() if k.startswith("stages.")}
    assert len(got) == len(expected)
    for (name, want), have in zip(expected.items(), got.values(), strict=True):
        assert torch.equal(have, want), name


def test_a_missing_pretrained_file_is_named(tmp_path):
    from pipeline.recipe import load_recipe

    recipe = load_recipe(None, [f"model.timm_pretrained={tmp_path / 'absent.pth'}"])
    with pytest.raises(RecipeError, match=r"model\.timm_pretrained: weights file .*absent\.pth"):
        build_model(recipe.model, 10)


def test_timm_pretrained_without_a_local_copy_names_the_key_and_never_touches_the_network(
    tmp_path,
):
    # An empty Hugging Face cache and no HF_HUB_OFFLINE set: the pipeline itself keeps timm
    # offline. Every socket connection or name lookup is refused and counted.
    script = (
        "import socket\n"
        "calls = []\n"
        "def refuse(*a, **k):\n"
        "    calls.append(a)\n"
        "    raise OSError('network refused by the test')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "from pipeline.errors import RecipeError\n"
        "from pipeline.models import build_model\n"
        "from pipeline.recipe import load_recipe\n"
        "try:\n"
        "    build_model(load_recipe(None, ['model.name=resnet18',"
        " 'model.timm_pretrained=true']).model, 10)\n"
        "except RecipeError as exc:\n"
        "    print(exc)\n"
        "print('network calls:', len(calls))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.timm_pretrained: no local copy of timm's weights for 'resnet18'" in proc.stdout
    assert "network calls: 0" in proc.stdout
