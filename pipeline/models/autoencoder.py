"""AlignMixup/AE: an embedding `e = f(A)`, a classifier on `e`, and a residual decoder `D(e)`.

Our design (the paper leaves it open; documented in docs/models.md):
- `f` (`model.ae.embedding`): `grid` (default), a 1×1 convolution `c → E` + BatchNorm + ReLU on
  `A`, so `e` keeps `A`'s grid and is a vector of `d = E·h·w` numbers (E = 1024 and d = 50,176
  for ResNet-50 at 224 px) and the decoder works at any input size that is a multiple of the
  backbone's stride. The paper's ablation (Table 6) also has `tensor`, a 2×2 convolution of
  stride 2 (its `E`, 128 × 2 × 2 on CIFAR), and `vector`, a fully connected layer on the
  flattened `A` (its `e ∈ R^512`), which needs the grid's side (`model.ae.grid`).
- `variational` (AlignMixup/VAE): `f` is the mean `μ`, and a second layer of the same shape
  (no BatchNorm, no ReLU) gives `log σ²`; the method samples `e = μ + σ·ε`. In eval the
  classifier reads `μ`.
- classifier: global average pooling of `e` and a linear layer.
- `D`: a projection to `decoder_width` channels on `e`'s grid (a 1×1 convolution; for a
  vector, a linear layer to `decoder_width × grid × grid`), then one stage per factor of 2 up to
  1/`decoder_output_stride` of the input (3 for 32 → 4), each nearest-neighbour ×2
  upsampling, 3×3 conv + BN + ReLU and `decoder_blocks` residual blocks, channels halving per
  stage down to `decoder_min_width`; a 3×3 conv to RGB in the normalised pixel space of the
  input, and bilinear upsampling by `decoder_output_stride` to the input size. Stopping the
  convolutions at 1/4 of the resolution keeps the decoder's cost below a ResNet-50 step
  (measured on the CPU at 224 px: 0.68 s against 1.26 s for batch 8; convolving up to full size
  took 4.8 s), and L_r is about shapes and colours, not pixel detail.
- `L_r` = mean squared error between `x̂` and `x` (normalised pixels), weight
  `method.recon_weight`, only on clean batches.
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


class VectorEmbedding(nn.Module):
    """`f` of kind `vector`: a linear layer on the flattened `A` (B, c, g, g) → e (B, E, 1, 1)
    (kept 4-D so that pooling, mixing and alignment code treat it like any feature map)."""

    def __init__(self, in_channels: int, out_channels: int, grid: int, norm_act: bool) -> None:
        super().__init__()
        self.grid = grid
        self.linear = nn.Linear(in_channels * grid * grid, out_channels, bias=not norm_act)
        self.post = (
            nn.Sequential(nn.BatchNorm1d(out_channels), nn.ReLU(inplace=True))
            if norm_act
            else nn.Identity()
        )

    def forward(self, a: Tensor) -> Tensor:
        if tuple(a.shape[-2:]) != (self.grid, self.grid):
            raise ValueError(
                f"model.ae.grid is {self.grid}, but A is {a.shape[-2]}×{a.shape[-1]} here: set "
                "it to the input size divided by the backbone's stride"
            )
        return self.post(self.linear(a.flatten(1)))[:, :, None, None]


class GridProjection(nn.Module):
    """The decoder's first layer for a vector `e` (B, E, 1, 1): linear to (B, width, g, g)."""

    def __init__(self, in_channels: int, width: int, grid: int) -> None:
        super().__init__()
        self.shape = (width, grid, grid)
        self.linear = nn.Linear(in_channels, width * grid * grid, bias=False)
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, e: Tensor) -> Tensor:
        return self.post(self.linear(e.flatten(1)).view(e.shape[0], *self.shape))


def embedding_layer(cfg: AEConfig, in_channels: int, norm_act: bool = True) -> nn.Module:
    """`f` of kind `cfg.embedding` (with BatchNorm and ReLU), or the VAE's `log σ²` layer of the
    same shape (`norm_act=False`: a plain layer with a bias)."""
    out = cfg.embed_channels
    if cfg.embedding == "vector":
        if cfg.grid is None:
            raise RecipeError(
                "model.ae.grid: embedding 'vector' is a linear layer on the flattened A, so it "
                "needs A's side (input size / backbone stride, e.g. 4 for 32 px at stride 8)"
            )
        return VectorEmbedding(in_channels, out, cfg.grid, norm_act)
    k = 1 if cfg.embedding == "grid" else 2
    if not norm_act:
        return nn.Conv2d(in_channels, out, k, stride=k)
    return nn.Sequential(
        nn.Conv2d(in_channels, out, k, stride=k, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class ResidualDecoder(nn.Module):
    """`D`: embedding (B, E, h', w') → image (B, 3, H, W), `upsamplings` ×2 stages from the
    first layer's grid, then bilinear ×`decoder_output_stride`."""

    def __init__(self, first: nn.Module, upsamplings: int, cfg: AEConfig) -> None:
        super().__init__()
        self.final_scale = cfg.decoder_output_stride
        widths = [
            max(cfg.decoder_width >> i, cfg.decoder_min_width) for i in range(upsamplings + 1)
        ]
        layers: list[nn.Module] = [first]
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
    """MixNet whose classifier reads `e = f(A)` and which can decode `e` back to an image
    (`decoder=False`: `f` alone, for AlignMixup mixing at e or E)."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        cfg: AEConfig,
        output_stride: int = 32,
        decoder: bool = True,
        **backbone: Any,
    ) -> None:
        """`backbone`: MixNet's other keywords (zero_init_last, pretrained, allow_download,
        timm_kwargs)."""
        self._embed_channels = cfg.embed_channels
        super().__init__(name, num_classes, output_stride, **backbone)
        self.has_embedding = True
        self.embedding_kind = cfg.embedding
        self.variational = cfg.variational
        self.embedding = embedding_layer(cfg, self.feature_channels)
        self.log_var = (
            embedding_layer(cfg, self.feature_channels, norm_act=False) if cfg.variational else None
        )
        self.has_decoder = decoder
        self.decoder = self._decoder(cfg) if decoder else None

    def _decoder(self, cfg: AEConfig) -> ResidualDecoder:
        stride = self.feature_stride  # model.output_stride, or the architecture's own
        if cfg.decoder_output_stride > stride:
            raise RecipeError(
                f"model.ae.decoder_output_stride ({cfg.decoder_output_stride}) must not exceed "
                f"the backbone's stride at A ({stride}, model.output_stride)"
            )
        upsamplings = int(math.log2(stride // cfg.decoder_output_stride))
        if cfg.embedding == "vector":
            first: nn.Module = GridProjection(cfg.embed_channels, cfg.decoder_width, cfg.grid)
        else:
            first = _conv_bn_relu(cfg.embed_channels, cfg.decoder_width, k=1)
            upsamplings += cfg.embedding == "tensor"  # e is on a grid half A's side
        return ResidualDecoder(first, upsamplings, cfg)

    def _head_channels(self) -> int:
        return self._embed_channels

    def compiled_parts(self) -> list[nn.Module]:
        """The backbone's parts, `f` (and the VAE's log σ² layer) and the decoder."""
        extra = [self.embedding, self.log_var, self.decoder]
        return [*super().compiled_parts(), *(m for m in extra if m is not None)]

    def embed(self, a: Tensor) -> Tensor:
        """`e = f(A)` (B, E, h', w'); for the VAE, the mean `μ`."""
        if self.embedding_kind == "tensor" and (a.shape[-2] % 2 or a.shape[-1] % 2):
            raise ValueError(
                f"model.ae.embedding: 'tensor' halves A's grid, which is {a.shape[-2]}×"
                f"{a.shape[-1]} here (odd); use 'grid' or an input size giving an even grid"
            )
        return self.embedding(a)

    def moments(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """AlignMixup/VAE: `(μ, log σ²)` of `e` given `A`."""
        if self.log_var is None:
            raise ValueError("moments: this model is not variational (model.ae.variational)")
        return self.embed(a), self.log_var(a)

    def classify(self, e: Tensor) -> Tensor:
        """Class scores from `e`."""
        return super().head(e)

    def decode(self, e: Tensor) -> Tensor:
        """`x̂ = D(e)`, the same size as the input image."""
        if self.decoder is None:
            raise ValueError("decode: this model has no decoder (an AlignMixup model with f only)")
        return self.decoder(e)

    def head(self, a: Tensor) -> Tensor:
        return self.classify(self.embed(a))
