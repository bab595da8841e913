"""The paper's small-image backbones, registered in timm: `preactresnet18` and `wrn16_8`.

AlignMixup's CIFAR-10/100 and Tiny-ImageNet results (its Table 1) use the PreAct ResNet-18 and
the WRN-16-8 of the authors' `cifar10_100/models/`: a 3×3 stem at stride 1, so a 32 px image
leaves a 4×4 (ResNet) or 8×8 (WRN) feature map `A`, and 16 or 64 positions to align. timm has
neither, so they are written here to the authors' layout (read, not copied) and registered with
timm, so that `model.name=preactresnet18` goes through `timm.create_model` like any other name.

Both are laid out as a `stem` and `stages` (with `norm_pre` after the last), which
`split_stages` turns into the levels the methods mix at: the input, after each stage, and `A`.
Their stride is fixed by design (`feature_stride`, 8 and 4); `model.output_stride` must say so.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import Tensor, nn

__all__ = ["PreActResNet", "WideResNet"]

# What timm.create_model passes on to every model function; these models have no weights.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


class PreActBlock(nn.Module):
    """He et al.'s pre-activation basic block as the authors wrote it: BN-ReLU-conv twice, and
    the shortcut always taken *after* the first BN-ReLU: a 1×1 conv (no BN) when the shape
    changes, else `relu(bn1(x))` itself, not the raw `x` of He et al.'s identity mapping.

    Their `shortcut` is an empty `nn.Sequential()` applied to `out = relu(bn1(x))`, so every
    block that keeps its shape adds the activated input. Architecture version 2 of
    `preactresnet18` (`ARCHITECTURE_VERSIONS`); version 1 added `x` there.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = out if self.shortcut is None else self.shortcut(out)
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideBlock(nn.Module):
    """Zagoruyko and Komodakis's wide basic block as the authors wrote it: BN-ReLU-conv (bias)
    twice, the stride on the second conv, a 1×1 conv (bias) on the raw input as shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=True)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=True)
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


def _stage(block: type[nn.Module], in_ch: int, out_ch: int, blocks: int, stride: int):
    return nn.Sequential(
        *(
            block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
            for i in range(blocks)
        )
    )


class _SmallNet(nn.Module):
    """What timm's create_model and `split_stages` expect: `stem`, `stages`, `norm_pre`,
    `num_features`, `forward_features`, and a pooled linear head (none with num_classes=0)."""

    stem: nn.Module
    stages: nn.Sequential
    norm_pre: nn.Module
    feature_stride: int

    def _finish(self, num_features: int, num_classes: int, global_pool: str) -> None:
        self.num_features = num_features
        self.global_pool = "avg" if global_pool == "" and num_classes else global_pool
        self.head = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm_pre(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        if self.global_pool:
            x = x.mean((2, 3))
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class PreActResNet(_SmallNet):
    """The authors' PreAct ResNet: 3×3 stem conv-BN-ReLU at stride 1, four stages of
    pre-activation blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2); no BN after the
    last stage, as in their code."""

    feature_stride = 8

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, global_pool: str = "avg"):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        self.stages = nn.Sequential(
            *(
                _stage(PreActBlock, widths[max(i - 1, 0)], w, n, 1 if i == 0 else 2)
                for i, (w, n) in enumerate(zip(widths, layers, strict=True))
            )
        )
        self.norm_pre = nn.Identity()
        self._finish(widths[-1], num_classes, global_pool)


class WideResNet(_SmallNet):
    """The authors' WRN-depth-k: a 3×3 stem conv (bias) to 16 channels, three stages of wide
    blocks (16k, 32k, 64k channels; strides 1, 2, 2), then BN-ReLU before pooling."""

    feature_stride = 4

    def __init__(
        self, depth: int = 16, width: int = 8, num_classes: int = 1000, global_pool: str = "avg"
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n, widths = (depth - 4) // 6, (16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=True)
        self.stages = nn.Sequential(
            *(
                _stage(WideBlock, 16 if i == 0 else widths[i - 1], w, n, 1 if i == 0 else 2)
                for i, w in enumerate(widths)
            )
        )
        # The authors construct this BN with momentum=0.9, PyTorch's meaning (a running mean
        # that follows each batch almost entirely), a carry-over from another framework's
        # convention; it changes only the running statistics that evaluation uses.
        self.norm_pre = nn.Sequential(nn.BatchNorm2d(widths[-1], momentum=0.9), nn.ReLU())
        self._finish(widths[-1], num_classes, global_pool)


def _build(cls: type[_SmallNet], name: str, pretrained: bool, kwargs: dict[str, Any], **arch):
    """A model from timm's keywords: no weights exist; the stride is the architecture's."""
    if pretrained:
        raise RuntimeError(f"{name} has no pretrained weights (trained from scratch, as the paper)")
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    stride = kwargs.pop("output_stride", cls.feature_stride)
    if stride != cls.feature_stride:
        raise TypeError(
            f"{name}: got an unexpected keyword argument 'output_stride' = {stride}; its stride "
            f"is {cls.feature_stride} by design"
        )
    if kwargs.pop("in_chans", 3) != 3:
        raise TypeError(f"{name}: got an unexpected keyword argument 'in_chans' (RGB only)")
    return cls(**arch, **kwargs)


@register_model
def preactresnet18(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """PreAct ResNet-18 for 32 and 64 px images (AlignMixup's CIFAR and Tiny-ImageNet)."""
    return _build(PreActResNet, "preactresnet18", pretrained, kwargs, layers=(2, 2, 2, 2))


@register_model
def wrn16_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-8 for 32 px images (AlignMixup's CIFAR)."""
    return _build(WideResNet, "wrn16_8", pretrained, kwargs, depth=16, width=8)
