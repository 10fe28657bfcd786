"""The pipeline YAML: the stage settings models composed, validated whole before any stage runs.

No Prefect here, so `dcgan-pipeline run --config` rejects a bad file in a second or two.
One crop size serves every source (`extract.size`, also the training resolution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from dcgan.settings import EvaluateSettings, TrainSettings
from dedup.settings import DedupSettings
from preprocessing.locks import LockSettings
from preprocessing.settings import (
    ExistingPath,
    FacesSettings,
    IngestSettings,
    LsunSettings,
    RunnerSettings,
    Settings,
    SettingsError,
    ShardSettings,
    describe_errors,
)

STAGES = ("extract", "dedup", "shard", "train")


class LsunSource(Settings):
    """An LSUN-format LMDB (`<category>_<split>_lmdb` directory or its data.mdb)."""

    type: Literal["lsun"] = "lsun"
    db: ExistingPath = Field(description="LMDB directory or its data.mdb")
    name: str | None = Field(None, description="source name (default: directory name without _lmdb)")


class DemoSource(Settings):
    """Photos bundled with scikit-image, cut into an LSUN-format LMDB under the work directory."""

    type: Literal["demo"] = "demo"
    records: int = Field(3000, ge=1, description="records in the generated LMDB")
    seed: int = Field(0, description="seed of the random crops")


class FacesSource(FacesSettings):
    """Scraped photos (folder, tar or Parquet table) -> face crops; size and max_pixels come from extract."""

    type: Literal["faces"] = "faces"
    photos: ExistingPath = Field(description="folder tree, tar of photos, or Parquet table with key + image")
    name: str | None = Field(None, description="source name (default: faces_<file or folder name>)")


class ImagesSource(IngestSettings):
    """An image folder tree (class subfolders) or table -> min-resized center crops; size from extract."""

    type: Literal["images"] = "images"
    images: ExistingPath = Field(description="folder tree (class subfolders) or Parquet table with key + image")
    name: str | None = Field(None, description="source name (default: images_<file or folder name>)")


Source = Annotated[LsunSource | DemoSource | FacesSource | ImagesSource, Field(discriminator="type")]
FROM_EXTRACT = ("size", "max_pixels")  # set once in extract:, copied into every photo source


class PipelineDedup(DedupSettings):
    enabled: bool = Field(True, description="run near-duplicate removal (off: shards ignore earlier keep flags)")


class PipelineTrain(TrainSettings):
    enabled: bool = Field(True, description="train after sharding")


class PipelineEvaluate(EvaluateSettings):
    enabled: bool = Field(True, description="evaluate the trained run")


class PipelineConfig(Settings):
    work: str = Field(description="work directory")
    sources: list[Source] = Field(min_length=1, description="the raw sources, extracted in order")
    extract: LsunSettings = Field(LsunSettings(), description="crop size for every source; LSUN partitioning")
    runner: RunnerSettings = Field(
        RunnerSettings(), description="where the extraction parts run: process, or {type: dask, address|workers}"
    )
    dedup: PipelineDedup = PipelineDedup()
    shard: ShardSettings = ShardSettings()
    train: PipelineTrain = PipelineTrain()
    evaluate: PipelineEvaluate = PipelineEvaluate()
    lock: LockSettings = Field(LockSettings(), description="what each stage does while another writer holds its files")

    @model_validator(mode="before")
    @classmethod
    def _one_size(cls, data: Any) -> Any:
        """Copy extract's size and max_pixels into photo sources, and the size into train.resolution."""
        if not isinstance(data, dict):
            return data
        extract = data.get("extract") or {}
        if not isinstance(extract, dict):
            return data
        size = extract.get("size", LsunSettings.model_fields["size"].default)
        shared = {
            "size": size,
            "max_pixels": extract.get("max_pixels", LsunSettings.model_fields["max_pixels"].default),
        }
        sources = []
        for i, src in enumerate(data.get("sources") or []):
            if isinstance(src, dict) and src.get("type") in ("faces", "images"):
                given = sorted(set(src) & set(FROM_EXTRACT))
                if given:
                    raise ValueError(f"sources.{i}: {', '.join(given)} are set once for every source, in extract:")
                src = {**src, **shared}
            sources.append(src)
        train = data.get("train") or {}
        if isinstance(train, dict) and train.get("enabled", True):
            if "resolution" in train and train["resolution"] != size:
                raise ValueError(f"train.resolution {train['resolution']} differs from extract.size {size}")
            train = {**train, "resolution": size}
        return {**data, "sources": sources, "train": train}


def load_config(path: str | Path) -> PipelineConfig:
    """Parse and validate a pipeline YAML file; the SettingsError names every offending field."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{p} is not valid YAML: {exc}") from None
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(f"invalid config {p}: {describe_errors(exc)}") from None


def stage_settings(model: type[Settings], section: Settings) -> Any:
    """A pipeline section as the stage's own model (without `enabled`, `type`, paths and names)."""
    return model.model_validate({k: v for k, v in section.model_dump().items() if k in model.model_fields})
