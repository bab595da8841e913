"""The schema of each recipe section (model, data, optim, train, tracking, and the base of every
method's settings), validated with pydantic so that defaults, types and error paths come from a
library. A whole recipe (YAML, `extends:`, `key=value` overrides) is `pipeline.recipe`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AEConfig",
    "DataConfig",
    "MethodSettings",
    "ModelConfig",
    "OptimConfig",
    "Section",
    "TrackingConfig",
    "TrainConfig",
]

# ImageNet's channel statistics: the normalisation of every recipe that does not set its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Section(BaseModel):
    """A recipe section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSettings(Section):
    """The `method` section. `name` picks a registered method (pipeline/methods/); that method's
    own settings class, a subclass of this one, holds and validates the other keys, so a key of
    another method is an unknown key. `name` cannot be reassigned: load a new recipe instead."""

    name: str = Field("baseline", frozen=True, description="a method in pipeline/methods/")


class AEConfig(Section):
    """The extra layer `f` (A → e) of AlignMixup/AE, of AlignMixup mixing at e or E, and the
    AE's decoder `D` (e → x̂); see pipeline/models/autoencoder.py and docs/models.md."""

    embedding: Literal["grid", "tensor", "vector"] = Field(
        "grid",
        description="f: grid = 1×1 conv on A's grid (ours); tensor = 2×2 conv, stride 2 (the "
        "paper's E); vector = FC over the flattened A (the paper's e ∈ R^E)",
    )
    embed_channels: int = Field(1024, ge=8, description="E: channels of e (d = E·h·w)")
    grid: int | None = Field(
        None, ge=1, description="embedding: vector: the side of A's grid (input size / stride)"
    )
    variational: bool = Field(
        False, description="AlignMixup/VAE: f gives μ and log σ², e = μ + σ·ε (docs/mixing.md)"
    )
    decoder_width: int = Field(656, ge=8, description="channels of the decoder's first stage")
    decoder_min_width: int = Field(64, ge=8)
    decoder_blocks: int = Field(2, ge=1, description="residual blocks per decoder stage")
    decoder_output_stride: Literal[1, 2, 4, 8] = Field(
        4, description="convolutions stop at 1/this of the input size; bilinear upsampling ends"
    )


class ModelConfig(Section):
    name: str = "resnet50"
    num_classes: int | None = Field(None, ge=2, description="None: from the dataset")
    pretrained: str | None = Field(None, description="path to a checkpoint to start from")
    timm_pretrained: bool | str = Field(
        False,
        description="timm's ImageNet weights: true from the local Hugging Face cache, or a path "
        "to a weights file (.safetensors/.pth/.bin); never downloaded unless allow_download",
    )
    allow_download: bool = Field(
        False, description="let timm download pretrained weights (a node with network)"
    )
    output_stride: Literal[8, 16, 32] = 32
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="more keywords for timm.create_model, e.g. drop_path_rate: 0.1 or (ResNets) "
        "channels: [32, 64, 128, 256]",
    )
    zero_init_last: bool | None = Field(
        None,
        description="timm ResNets: zero the last BatchNorm of each residual branch (timm: "
        "True); False: every BatchNorm weight 1, as the authors; None: the model's default",
    )
    channels_last: bool = True
    compile: bool = Field(
        False,
        description="torch.compile the model's stages, classifier, f and decoder in place "
        "(the method's host draws and the Sinkhorn op stay eager between them)",
    )
    ae: AEConfig = Field(default_factory=AEConfig)


class DataConfig(Section):
    backend: Literal["dali", "torchvision"] = "dali"
    root: str = "data/imagenet"
    layout: Literal["imagefolder", "filelist", "cub", "cifar10", "cifar100", "tinyimagenet"] = (
        "imagefolder"
    )
    train_list: str | None = Field(None, description="filelist layout: 'path label' lines")
    val_list: str | None = None
    batch_size: int = Field(256, ge=1, description="per device")
    val_batch_size: int | None = Field(None, ge=1)
    num_threads: int = Field(4, ge=1, description="DALI threads / DataLoader workers")
    hw_decoder_load: float = Field(
        0.65,
        ge=0,
        le=1,
        description="DALI mixed decode: share of JPEGs sent to the GPU's hardware decoder (DALI "
        "2.x defaulted to 0.9 for a while, then 0.65 again); docs/gpu.md",
    )
    plan_workers: int = Field(
        2,
        ge=0,
        description="DALI: processes drawing the augmentation ahead of the pipeline; 0: in "
        "the training process",
    )
    train_size: int = Field(224, ge=8)
    val_resize: int = Field(256, ge=8)
    val_crop: int = Field(224, ge=8)
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_padding: int = Field(
        4, ge=0, description="cifar10/cifar100/tinyimagenet: random crop after this zero padding"
    )
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation")
    lighting: float = Field(0.1, ge=0, description="PCA lighting alphastd")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    skip_corrupt: bool = False
    index_dir: str | None = Field(
        None,
        description="where the dataset index is kept; None: <root>/.pipeline_index when "
        "writable, else the run's output folder (docs/data.md)",
    )
    max_val_samples: int | None = Field(None, ge=1)


class OptimConfig(Section):
    name: Literal["authors_sgd", "timm"] = "authors_sgd"
    timm_opt: str = Field("sgd", description="timm.optim.create_optimizer_v2 opt name")
    lr: float = Field(0.1, gt=0, description="at reference_batch; scaled linearly")
    reference_batch: int = Field(256, ge=1, description="lr is lr * global_batch / this")
    scale_lr: bool = True
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine", "timm"] = "step"
    timm_sched: str = Field("cosine", description="timm.scheduler.create_scheduler_v2 name")
    milestones: list[int] = Field(default_factory=lambda: [75, 150, 225], description="epochs")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    head_lr_ratio: float = Field(
        1.0, gt=0, description="lr multiplier for head_params (wsolevaluation's classifier ratio)"
    )
    head_params: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes that get head_lr_ratio, e.g. [stages.3., classifier.]",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)


class TrainConfig(Section):
    epochs: int = Field(300, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop early after this many steps")
    amp: Literal["no", "bf16", "fp16"] = "bf16"
    seed: int = 0
    output_dir: str | None = Field(None, description="None: runs/<name>")
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(1, ge=1, description="epochs between validations")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    checkpoint_minutes: float | None = Field(
        None,
        gt=0,
        description="None: a checkpoint at every epoch's end; else at an epoch's end only once "
        "this many minutes have passed since the last (short epochs: CIFAR, Tiny-ImageNet)",
    )
    keep_checkpoints: int = Field(3, ge=1)
    resume: Literal["auto", "never"] | str = "auto"
    preempt_check_every: int = Field(20, ge=1, description="steps between preemption checks")
    collective_timeout_minutes: float = Field(
        10.0,
        gt=0,
        description="how long a rank waits in a collective for the others before the run stops "
        "with exit 5 (requeued by slurm/launch.sh): a hung or lost rank frees the allocation",
    )
    cpu: bool = False
    progress: bool = Field(
        True, description="main process: a tqdm bar on a terminal, else a line every log_seconds"
    )
    log_seconds: float = Field(
        60.0,
        gt=0,
        description="without a terminal (Slurm): seconds between progress lines (epoch, step, "
        "loss, lr, img/s, the run's ETA); one at each epoch's end too",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="micro-batches per optimiser step (each mixed within itself, as on separate "
        "GPUs); the lr scales with batch_size × GPUs × this",
    )
    global_batch: int | None = Field(
        None,
        ge=1,
        description="derive grad_accum_steps = this / (data.batch_size × GPUs); must divide",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an EMA of the weights (timm ModelEmaV3), updated every optimiser step "
        "with this decay, validated and saved beside the raw model; None: off",
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_no_means_no(cls, v: Any) -> Any:
        """YAML reads a bare `no` as False; it means no mixed precision."""
        return "no" if v is False else v


class TrackingConfig(Section):
    enabled: bool = Field(True, description="false: no MLflow at all; the run's journal only")
    experiment: str = "alignmixup"
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI or sqlite")
    run_name: str | None = None
    required: bool = Field(
        False, description="true: stop within 30 s (exit 2) if the tracking store does not answer"
    )
    flush_timeout: float = Field(
        60.0,
        ge=0,
        description="s to wait at the end of a run for MLflow; the rest waits in the journal",
    )
    system_metrics: bool = True
    system_metrics_interval: float = Field(10.0, gt=0, description="s between system samples")
