"""AlignMixup/AE: an embedding `e = f(A)`, a classifier on `e`, and a residual decoder `D(e)`.

Our design (the paper leaves it open; documented in docs/models.md):
- `f`: 1×1 convolution `c → E` + BatchNorm + ReLU on `A`. `e` keeps `A`'s grid, so it is a
  vector of `d = E·h·w` numbers (E = 1024 and d = 50,176 for ResNet-50 at 224 px); the decoder can
  then work at any input size that is a multiple of the backbone's stride.
- classifier: global average pooling of `e` and a linear layer.
- `D`: a 1×1 projection to `decoder_width` channels, then one stage per factor of 2 from the
  backbone's stride down to `decoder_output_stride` (3 for 32 → 4), each nearest-neighbour ×2
  upsampling, 3×3 conv + BN + ReLU and `decoder_blocks` residual blocks, channels halving per
  stage down to `decoder_min_width`; a 3×3 conv to RGB in the normalised pixel space of the
  input, and bilinear upsampling by `decoder_output_stride` to the input size. Stopping the
  convolutions at 1/4 of the resolution keeps the decoder's cost below a ResNet-50 step
  (measured on the CPU at 224 px: 0.68 s against 1.26 s for batch 8; convolving up to full size
  took 4.8 s), and L_r is about shapes and colours, not pixel detail.
- `L_r` = mean squared error between `x̂` and `x` (normalised pixels), weight
  `method.ae_recon_weight`, only on clean batches.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from torch import Tensor, nn

from pipeline.config import AEConfig
from pipeline.errors import RecipeError
from pipeline.models.backbone import MixNet


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 conv + BN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class ResidualDecoder(nn.Module):
    """`D`: embedding grid (B, E, h, w) → image (B, 3, h·2^n, w·2^n)."""

    def __init__(self, in_channels: int, upsamplings: int, cfg: AEConfig) -> None:
        super().__init__()
        self.final_scale = cfg.decoder_output_stride
        widths = [
            max(cfg.decoder_width >> i, cfg.decoder_min_width) for i in range(upsamplings + 1)
        ]
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, widths[0], k=1)]
        for cin, cout in itertools.pairwise(widths):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv_bn_relu(cin, cout)]
            layers += [ResidualBlock(cout) for _ in range(cfg.decoder_blocks)]
        layers.append(nn.Conv2d(widths[-1], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, e: Tensor) -> Tensor:
        out = self.net(e)
        if self.final_scale == 1:
            return out
        return nn.functional.interpolate(
            out, scale_factor=self.final_scale, mode="bilinear", align_corners=False
        )


class AutoEncoderMixNet(MixNet):
    """MixNet whose classifier reads `e = f(A)` and which can decode `e` back to an image."""

    has_decoder = True

    def __init__(
        self,
        name: str,
        num_classes: int,
        cfg: AEConfig,
        output_stride: int = 32,
        **backbone: Any,
    ) -> None:
        """`backbone`: MixNet's other keywords (zero_init_last, pretrained, allow_download,
        timm_kwargs)."""
        self._embed_channels = cfg.embed_channels
        super().__init__(name, num_classes, output_stride, **backbone)
        self.embedding = _conv_bn_relu(self.feature_channels, cfg.embed_channels, k=1)
        stride = self.feature_stride  # model.output_stride, or the architecture's own
        if cfg.decoder_output_stride > stride:
            raise RecipeError(
                f"model.ae.decoder_output_stride ({cfg.decoder_output_stride}) must not exceed "
                f"the backbone's stride at A ({stride}, model.output_stride)"
            )
        upsamplings = int(math.log2(stride // cfg.decoder_output_stride))
        self.decoder = ResidualDecoder(cfg.embed_channels, upsamplings, cfg)

    def _head_channels(self) -> int:
        return self._embed_channels

    def embed(self, a: Tensor) -> Tensor:
        """`e = f(A)`, kept on `A`'s grid (B, E, h, w)."""
        return self.embedding(a)

    def classify(self, e: Tensor) -> Tensor:
        """Class scores from `e`."""
        return super().head(e)

    def decode(self, e: Tensor) -> Tensor:
        """`x̂ = D(e)`, the same size as the input image."""
        return self.decoder(e)

    def head(self, a: Tensor) -> Tensor:
        return self.classify(self.embed(a))
