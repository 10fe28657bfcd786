"""Training and evaluation settings, declared once (see preprocessing.settings for the contract).

Defaults follow Radford et al. (2015): Adam(lr 2e-4, beta1 0.5), batch 128, z of 100
dimensions uniform in [-1, 1]. The fast step is bf16 autocast + channels_last where bfloat16 is
faster (a GPU, or a CPU with bfloat16 products), with fused Adam; CUDA graphs on CUDA only.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from preprocessing.settings import Device, ExistingDir, ExistingFile, Settings

RESOLUTIONS = (32, 64, 128)
Precision = Literal["auto", "fp32", "bf16"]  # dcgan.precision says what each means, for training and evaluation


class TrainSettings(Settings):
    """One DCGAN training run."""

    steps: int = Field(1000, ge=1, description="total training steps")
    resolution: int = Field(64, description="32, 64 or 128 px; must match the shards", examples=[32])
    batch_size: int = Field(128, ge=1, description="batch size per process (global: x nproc_per_node)")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate (a new value on resume wins)")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1")
    nz: int = Field(100, ge=1, description="dimensions of z")
    ngf: int = Field(64, ge=1, description="generator width")
    ndf: int = Field(64, ge=1, description="discriminator width")
    noise: Literal["uniform", "normal"] = Field("uniform", description="prior of z: uniform in [-1, 1] (the paper)")
    discriminator: Literal["dcgan", "imagenet32"] = Field(
        "dcgan", description="dcgan, or imagenet32 (the paper's 32 px CIFAR-10 feature D)"
    )
    seed: int = Field(0, description="seed of weights, batches and noise (training is a function of it)")
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N")
    log_every: int = Field(50, ge=1, description="steps between metric lines")
    sample_every: int = Field(500, ge=1, description="steps between sample grids")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept (plus best.pt)")
    cache_gb: float = Field(8.0, ge=0, description="decoded-cache budget in GiB; above it, stream the shards")
    workers: int = Field(2, ge=0, description="DataLoader workers when streaming shards")
    deterministic: bool = Field(False, description="deterministic CUDA kernels (slower)")
    loop: Literal["fast", "textbook"] = Field("fast", description="fast, or textbook (pytorch/examples' loop)")
    precision: Precision = Field(
        "auto",
        description="bf16 autocast where it is faster (auto: a GPU, or a CPU with bfloat16 products, "
        "timed once per device), always, or never (fp32); weights and Adam stay float32",
    )
    channels_last: bool = Field(True, description="channels_last layout when the step runs in bf16")
    fused_adam: bool = Field(True, description="fused Adam (one kernel for all parameters, CPU or CUDA)")
    fast_layers: bool = Field(
        True, description="on the CPU, G's and D's strided layers in faster forms of the same layers (dcgan.layers)"
    )
    cuda_graphs: bool = Field(True, description="capture the whole step as a CUDA graph (single process)")
    gpu_cache: bool = Field(True, description="decoded images in GPU memory when they fit cache_gb")
    best_images: int = Field(512, ge=0, description="SWD samples per checkpoint to keep best.pt (0: off)")
    on_nan: Literal["rollback", "stop"] = Field(
        "rollback", description="rollback (to the last checkpoint, lowering lr) or stop"
    )
    nan_lr_factor: float = Field(0.5, gt=0, lt=1, description="learning-rate factor at each NaN rollback")
    max_rollbacks: int = Field(3, ge=0, description="NaN rollbacks before training stops")
    tensorboard: bool = Field(True, description="write TensorBoard events to RUN/tensorboard")
    nproc_per_node: int = Field(1, ge=1, description="data-parallel processes under torchrun (one per GPU)")
    init_from: ExistingFile = Field(
        None, description="start G and D from this checkpoint's weights (warm start; optimizers start fresh)"
    )

    @field_validator("resolution")
    @classmethod
    def _known_resolution(cls, value: int) -> int:
        if value not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {value}")
        return value

    @field_validator("best_images")
    @classmethod
    def _swd_needs_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("best_images must be 0 (off) or >= 2, got 1")
        return value

    @field_validator("discriminator")
    @classmethod
    def _discriminator_fits_resolution(cls, value: str, info: ValidationInfo) -> str:
        resolution = info.data.get("resolution")  # declared above, so already validated
        if value == "imagenet32" and resolution not in (None, 32):
            raise ValueError(f"the imagenet32 discriminator trains at resolution 32, not {resolution}")
        return value


class RetrainSettings(TrainSettings):
    """A scheduled retrain: train a challenger on new data, compare it with the champion, promote only if better."""

    metric: Literal["swd", "fid", "kid"] = Field(
        "swd", description="comparison metric, lower is better (fid/kid need inception)"
    )
    margin: float = Field(
        0.0, ge=0, lt=1, description="promote only if the challenger is lower by this share of the champion's value"
    )
    protocol_images: int = Field(1024, ge=16, description="reference images and samples of the fixed comparison")
    inception: ExistingFile = Field(None, description="local Inception-v3 weights: FID and KID join the comparison")
    warm_start: bool = Field(False, description="start the challenger from the champion's weights, not from scratch")
    min_new_samples: int = Field(1, ge=1, description="retrain only when the shards gained at least this many samples")

    @model_validator(mode="after")
    def _inception_metrics_need_weights(self) -> RetrainSettings:
        if self.metric in ("fid", "kid") and self.inception is None:
            raise ValueError(f"metric {self.metric} needs inception: the path of local Inception-v3 weights")
        return self


class EvaluateSettings(Settings):
    """Evaluation of a run: sample quality and visualisations always; the paper's protocols when given data."""

    cifar10: ExistingDir = Field(None, description="folder with CIFAR-10 train.parquet and test.parquet")
    svhn: ExistingDir = Field(None, description="folder with SVHN train_32x32.mat and test_32x32.mat")
    limit_train: int | None = Field(
        None, ge=1, description="CIFAR-10: a seeded subset of the training images", examples=[100]
    )
    limit_test: int | None = Field(
        None, ge=1, description="CIFAR-10: a seeded subset of the test images", examples=[50]
    )
    svhn_draws: int = Field(10, ge=1, description="SVHN: draws of the 1000 labelled images")
    swd_images: int = Field(2048, ge=16, description="generated and training images for SWD, FID and KID")
    guided_images: int = Field(512, ge=1, description="training images ranked for guided backpropagation")
    inception: ExistingFile = Field(
        None,
        description="local Inception-v3 weights for FID/KID, never downloaded: pytorch-fid's "
        "pt_inception-2015-12-05-*.pth (the FID network) or torchvision's inception_v3_google-*.pth",
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N, for features and generation")
    svm_c_grid: str = Field(
        "1e-6,1e-5,1e-4,1e-3",
        description="starting C values of the L2-SVM, comma-separated, tried from small to large",
        examples=["1e-5,1e-4"],
    )
    svm_grid_extensions: int = Field(
        3, ge=0, le=10, description="extra C values per end of the grid while the best C sits at that end"
    )
    arithmetic: str | None = Field(
        None,
        description="vector arithmetic concepts as indices on the numbered sample sheet of an earlier "
        "evaluation of this run, e.g. A=1,5,9;B=2,3,4;C=7,8,11",
        examples=["A=1,5,9;B=2,3,4;C=7,8,11"],
    )
    expression: str | None = Field(None, description="concepts joined by + and -, e.g. A-B+C", examples=["A-B+C"])
    precision: Precision = Field(
        "auto",
        description="CIFAR-10/SVHN: D features and the SVM's Hessian products in bfloat16 where it is faster "
        "(auto: a GPU, or a CPU with bfloat16 products), always, or never; the SVM's gradient stays float32",
    )

    @field_validator("svm_c_grid")
    @classmethod
    def _positive_c_values(cls, value: str) -> str:
        try:
            grid = [float(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(f"svm_c_grid must be comma-separated numbers, got {value!r}") from None
        if not grid or not all(math.isfinite(c) and c > 0 for c in grid):
            raise ValueError(f"svm_c_grid values must be positive and finite, got {value!r}")
        return value

    @model_validator(mode="after")
    def _arithmetic_needs_both(self) -> EvaluateSettings:
        if (self.arithmetic is None) != (self.expression is None):
            raise ValueError("vector arithmetic needs both the concepts (arithmetic) and an expression")
        return self

    def c_grid(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.svm_c_grid.split(","))
