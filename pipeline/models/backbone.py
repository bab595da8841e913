"""timm backbones split into levels, so that methods can mix at the input, after a stage, or at A.

Level 0 is the input image, level k the output of stage k, level L the last feature tensor
`A` (B, c, h, w). The classifier `g` is global average pooling and a linear layer (docs/models.md).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from pipeline.errors import RecipeError


class _ForwardFeatures(nn.Module):
    """One stage running timm's `forward_features`; token outputs (ViTs) become a spatial grid."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone.forward_features(x)
        if out.ndim == 4:
            return out
        if out.ndim != 3:
            raise ValueError(
                f"backbone features must be 3D tokens or 4D maps, got {tuple(out.shape)}"
            )
        tokens = out[:, self.prefix_tokens :]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot arrange {tokens.shape[1]} patch tokens as a square grid")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)


def split_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages in order; the last one ends at the feature tensor `A`.

    ResNet-style models (timm `layer1..layer4`) and stem+stages models (ConvNeXt, ...) give one
    level per stage, so manifold mixup can act after any of them; other models run as a single
    stage through `forward_features` (mixing at the input and at `A` still works).
    """
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)) and hasattr(backbone, "conv1"):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
        return [
            nn.Sequential(stem, backbone.layer1),
            backbone.layer2,
            backbone.layer3,
            backbone.layer4,
        ]
    stages = getattr(backbone, "stages", None)
    if hasattr(backbone, "stem") and isinstance(stages, nn.Sequential) and len(stages) > 1:
        parts: list[nn.Module] = [nn.Sequential(backbone.stem, stages[0]), *list(stages)[1:]]
        norm_pre = getattr(backbone, "norm_pre", None)
        if norm_pre is not None and not isinstance(norm_pre, nn.Identity):
            parts[-1] = nn.Sequential(parts[-1], norm_pre)
        return parts
    return [_ForwardFeatures(backbone)]


@contextmanager
def _offline(allowed: bool):
    """No network for Hugging Face Hub inside (timm fetches weights through it) unless allowed:
    the environment variable for new imports, the constant for one already made."""
    if allowed:
        yield
        return
    import huggingface_hub.constants as hub

    before_env, before = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _pretrained_kwargs(name: str, pretrained: bool | str) -> dict:
    """timm.create_model arguments for `model.timm_pretrained` (False, True or a file path)."""
    if pretrained is False:
        return {"pretrained": False}
    if pretrained is True:
        return {"pretrained": True}
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise RecipeError(f"model.timm_pretrained: weights file {path} does not exist")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


# create_backbone's own keywords to timm.create_model, never taken from model.timm_kwargs.
_OWN_KEYWORDS = ("output_stride", "zero_init_last", "pretrained", "pretrained_cfg_overlay")


def create_backbone(
    name: str,
    output_stride: int = 32,
    zero_init_last: bool | None = None,
    pretrained: bool | str = False,
    allow_download: bool = False,
    timm_kwargs: dict | None = None,
) -> tuple[list[nn.Module], int, int]:
    """A timm model without its head, as stages, its number of feature channels and its
    stride at `A` (`output_stride`, or the model's own `feature_stride` where it has one).

    `zero_init_last` goes to timm (ResNets: zero the last BatchNorm weight of each residual
    branch, timm's default; False: every BatchNorm weight 1, as the AlignMixup authors'
    ResNet); None keeps the model's own default. `pretrained` (`model.timm_pretrained`) loads
    timm's weights from the local Hugging Face cache (True) or a file; nothing is downloaded
    unless `allow_download`. `timm_kwargs` (`model.timm_kwargs`) are passed on as they are,
    except those this function sets itself.
    """
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    clash = sorted(set(timm_kwargs or {}) & {*kwargs, *_OWN_KEYWORDS})
    if clash:
        raise RecipeError(
            f"model.timm_kwargs.{clash[0]}: set by the pipeline itself (use model.{clash[0]} "
            "where there is one)"
        )
    kwargs.update(timm_kwargs or {})
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if zero_init_last is not None:
        kwargs["zero_init_last"] = zero_init_last
    kwargs.update(_pretrained_kwargs(name, pretrained))
    try:
        with _offline(allow_download):
            backbone = timm.create_model(name, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown model names
        if pretrained is not False and timm.is_model(name):
            raise RecipeError(f"model.timm_pretrained: {name}: {exc}") from None
        raise RecipeError(f"model.name: timm has no model {name!r} ({exc})") from None
    except OSError as exc:  # huggingface_hub: not in the local cache, and offline
        if pretrained is not True:
            raise
        raise RecipeError(
            f"model.timm_pretrained: no local copy of timm's weights for {name!r} in the Hugging "
            f"Face cache ({type(exc).__name__}); nothing is downloaded on a cluster node. Fetch "
            f'them once where there is network (python -c "import timm; timm.create_model('
            f"'{name}', pretrained=True)\", same HF_HOME), give a weights file as "
            "model.timm_pretrained, or set model.allow_download=true"
        ) from None
    except TypeError as exc:  # a keyword the model's class does not take
        own = {k: f"model.{k}" for k in ("zero_init_last", "output_stride")}
        own.update({k: f"model.timm_kwargs.{k}" for k in timm_kwargs or {}})
        key = next((k for k in own if f"'{k}'" in str(exc)), None)  # "... argument 'key'"
        if key is None:
            raise
        raise RecipeError(f"{own[key]}: timm model {name!r} has no such setting ({exc})") from None
    stride = int(getattr(backbone, "feature_stride", output_stride))
    return split_stages(backbone), int(backbone.num_features), stride


class MixNet(nn.Module):
    """Encoder `F` as levels plus the classifier `g` (pool + linear); see docs/architecture.md.

    Its capabilities are declared, not guessed: methods, the model file and the tools read these
    flags (AutoEncoderMixNet sets them), never `hasattr` on the model."""

    has_embedding: bool = False  # an extra layer f: `embed`, `classify` (AutoEncoderMixNet)
    embedding_kind: str | None = None  # f's output: "vector", "tensor" or "grid" (model.ae)
    variational: bool = False  # f gives μ and log σ² (`moments`): AlignMixup/VAE
    has_decoder: bool = False  # `decode`: AlignMixup/AE

    def __init__(
        self,
        name: str,
        num_classes: int,
        output_stride: int = 32,
        zero_init_last: bool | None = None,
        pretrained: bool | str = False,
        allow_download: bool = False,
        timm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.timm_name = name
        stages, self.feature_channels, self.feature_stride = create_backbone(
            name, output_stride, zero_init_last, pretrained, allow_download, timm_kwargs
        )
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(self._head_channels(), num_classes)

    def _head_channels(self) -> int:
        return self.feature_channels

    @property
    def num_levels(self) -> int:
        return len(self.stages)

    def forward_levels(self, h: Tensor, start: int, stop: int) -> Tensor:
        """Run stages start+1 … stop: level `start` in, level `stop` out."""
        if not 0 <= start <= stop <= self.num_levels:
            raise ValueError(f"levels must satisfy 0 <= start <= stop <= {self.num_levels}")
        for stage in self.stages[start:stop]:
            h = stage(h)
        return h

    def features(self, x: Tensor) -> Tensor:
        """The last feature tensor `A` (B, c, h, w)."""
        return self.forward_levels(x, 0, self.num_levels)

    def head(self, a: Tensor) -> Tensor:
        """Class scores from `A`."""
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def compiled_parts(self) -> list[nn.Module]:
        """The modules `compile_parts` compiles: every stage and the classifier."""
        return [*self.stages, self.classifier]

    def compile_parts(self, **options) -> None:
        """`torch.compile` each part the methods call, in place (`model.compile: true`).

        The parts, not the step: a method draws λ, partners and its branch on the host and
        runs the Sinkhorn op between parts, so a compiled step would break its graph there and
        recompile for every new λ. Each part is a pure tensor function of fixed shapes: one
        graph, no break, compiled once per mode (train, eval); the mixing between parts runs
        eagerly with λ as a Python float. Parameter names do not change.
        """
        for module in self.compiled_parts():
            module.compile(**options)
