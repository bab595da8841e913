"""Models: timm backbones split into levels, and the AlignMixup/AE variant."""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.models import small  # noqa: F401  (registers preactresnet18 and wrn16_8 in timm)
from pipeline.models.autoencoder import AutoEncoderMixNet
from pipeline.models.backbone import MixNet

__all__ = ["AutoEncoderMixNet", "MixNet", "build_model", "count_parameters"]


def build_model(
    cfg: ModelConfig, num_classes: int, autoencoder: bool = False, embedding: bool = False
) -> MixNet:
    """The model a recipe asks for: `autoencoder` adds `f` and the decoder (AlignMixup/AE),
    `embedding` adds `f` alone (AlignMixup mixing at e or E); `cfg.ae` shapes both."""
    backbone = {
        "zero_init_last": cfg.zero_init_last,
        "pretrained": cfg.timm_pretrained,
        "allow_download": cfg.allow_download,
        "timm_kwargs": cfg.timm_kwargs,
    }
    if autoencoder or embedding:
        return AutoEncoderMixNet(
            cfg.name, num_classes, cfg.ae, cfg.output_stride, decoder=autoencoder, **backbone
        )
    return MixNet(cfg.name, num_classes, cfg.output_stride, **backbone)


def count_parameters(model) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters())
