"""Settings of the extraction and sharding stages: each field declared once, with its limits and help.

These pydantic models are the single source of truth: the CLI generates its options from
them, the flows take them as parameters (so Prefect validates deployment parameters with the
same rules and renders them as a form), and the pipeline YAML composes them.
`Settings` and the path and device helpers below are shared by dedup/ and dcgan/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from preprocessing.errors import UserError
from preprocessing.images import DEFAULT_MAX_PIXELS


class Settings(BaseModel):
    """Base of every settings model: unknown keys are errors; frozen, so a validated value stays valid."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SettingsError(UserError):
    """Settings that break a rule; the message names each offending field."""


def parse_settings(model: type[S], values: dict[str, Any], where: str) -> S:
    """Validate `values` as `model`; a SettingsError lists `field: problem` for every bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(f"invalid {where}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """`train.best_images: best_images must be 0 (off) or >= 2, got 1; ...` on one line."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


S = TypeVar("S", bound="Settings")


def _existing(kind: str) -> AfterValidator:
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        if kind == "file" and not p.is_file():
            raise ValueError(f"no file at {value}")
        if kind == "dir" and not p.is_dir():
            raise ValueError(f"no directory at {value}")
        if kind == "any" and not p.exists():
            raise ValueError(f"nothing at {value}")
        return value

    return AfterValidator(check)


# Optional paths that must exist when given (checked where the settings are validated: nothing is downloaded).
ExistingFile = Annotated[str | None, _existing("file"), Field(json_schema_extra={"path": "file"})]
ExistingDir = Annotated[str | None, _existing("dir"), Field(json_schema_extra={"path": "dir"})]
ExistingPath = Annotated[str, _existing("any"), Field(json_schema_extra={"path": "any"})]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value


# Whether CUDA exists is checked when a run starts, on the machine that runs it (dcgan.distributed.device_for).
Device = Annotated[str, AfterValidator(_device), Field(examples=["cpu", "auto"])]

CropSize = Annotated[int, Field(ge=8, le=1024)]
MaxPixels = Annotated[int, Field(ge=1)]


class LsunSettings(Settings):
    """LSUN LMDB extraction (also the pipeline's `extract:` section, whose size applies to every source)."""

    size: CropSize = Field(64, description="output crop size in pixels", examples=[32])
    part_size: int = Field(10_000, ge=1, description="records per partition (one task each)")
    max_pixels: MaxPixels = Field(DEFAULT_MAX_PIXELS, description="reject larger images (decompression-bomb guard)")
    min_side: int | None = Field(
        None, ge=1, description="reject images with a shorter side (default: half the crop size)", examples=[16]
    )

    def effective_min_side(self) -> int:
        """Images whose short side is under half the crop are rejected: 2x+ upscaling makes blur, not data."""
        return self.min_side if self.min_side is not None else max(1, self.size // 2)


class FacesSettings(Settings):
    """Face crops from scraped photos."""

    size: CropSize = Field(64, description="output crop size in pixels", examples=[32])
    detector: Literal["haar", "yunet"] = Field("haar", description="haar (bundled with OpenCV) or yunet (needs model)")
    model: ExistingFile = Field(None, description="YuNet ONNX file (face_detection_yunet_2023mar.onnx)")
    min_face: int = Field(64, ge=8, description="keep faces whose box short side is at least this (source px)")
    margin: float = Field(0.25, ge=0, le=1, description="context added around the box, as a share of its side")
    part_size: int = Field(1000, ge=1, description="photos per partition (one task each)")
    max_pixels: MaxPixels = Field(DEFAULT_MAX_PIXELS, description="reject larger photos (decompression-bomb guard)")

    @model_validator(mode="after")
    def _yunet_needs_model(self) -> FacesSettings:
        if self.detector == "yunet" and self.model is None:
            raise ValueError("the yunet detector needs model: the path of its ONNX file (nothing is downloaded)")
        return self


class IngestSettings(Settings):
    """ImageNet-style ingestion: min-resize and center crop, one crop per image."""

    size: CropSize = Field(32, description="output crop size in pixels", examples=[64])
    part_size: int = Field(5000, ge=1, description="images per partition (one task each)")
    max_pixels: MaxPixels = Field(DEFAULT_MAX_PIXELS, description="reject larger images (decompression-bomb guard)")


_SCHEDULER = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:]+\]|[^\s:/\[\]]+):\d{1,5}$")


class RunnerSettings(Settings):
    """Where the parts of a mapped stage run: local processes, or a Dask cluster (through prefect-dask).

    `process` is one process per core on this machine. `dask` with `address` uses an existing
    cluster (its workers must see the inputs and the work directory at the same paths: shared
    storage); `dask` with `workers` starts a temporary local cluster of that many processes.
    A plain string `process` is accepted for the default.
    """

    type: Literal["process", "dask"] = Field("process", description="process (this machine) or dask")
    address: str | None = Field(
        None,
        description="scheduler of an existing Dask cluster, e.g. tcp://HOST:8786",
        examples=["tcp://127.0.0.1:8786"],
    )
    workers: int | None = Field(None, ge=1, description="processes of a temporary local Dask cluster", examples=[2])

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_place(self) -> RunnerSettings:
        if self.type == "process" and (self.address or self.workers):
            raise ValueError("runner process takes neither address nor workers (use type: dask)")
        if self.type == "dask" and (self.address is None) == (self.workers is None):
            raise ValueError("runner dask needs exactly one of address (an existing cluster) or workers (a local one)")
        if self.address is not None and not _SCHEDULER.match(self.address):
            raise ValueError(f"address must look like tcp://HOST:PORT, got {self.address!r}")
        return self

    def describe(self) -> str:
        if self.type == "process":
            return "local process pool"
        return f"Dask cluster at {self.address}" if self.address else f"temporary local Dask cluster of {self.workers}"


class ShardSettings(Settings):
    """The final shuffled WebDataset shards."""

    maxcount: int = Field(10_000, ge=1, description="samples per shard")
    min_shards: int = Field(
        1, ge=1, description="write at least this many shards (>= ranks x loader workers when streaming under DDP)"
    )
    maxsize: int = Field(1 << 30, ge=1024, description="bytes per shard")
    seed: int = Field(0, description="shuffle seed")
    dedup: bool = Field(True, description="leave out items dedup did not keep (if WORK/dedup/codes.parquet exists)")
