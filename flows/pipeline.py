"""The full DAG from one YAML config: sources -> extraction -> shards -> training -> report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Literal

import yaml
from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dcgan.models import RESOLUTIONS
from flows.dedup import dedup_flow
from flows.evaluate import evaluate_flow
from flows.lsun import lsun_extract_flow
from flows.photos import faces_flow, ingest_flow
from flows.shard import shard_flow
from flows.train import train_flow
from preprocessing.demo_data import build_demo_lmdb
from preprocessing.images import DEFAULT_MAX_PIXELS

STAGES = ("extract", "dedup", "shard")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LsunSource(_Strict):
    type: Literal["lsun"] = "lsun"
    db: str
    name: str | None = None


class DemoSource(_Strict):
    """Photos bundled with scikit-image, cut into an LSUN-format LMDB under the work directory."""

    type: Literal["demo"] = "demo"
    records: int = Field(3000, ge=1)
    seed: int = 0


class FacesSource(_Strict):
    """Scraped photos (folder, tar or Parquet table) -> face crops."""

    type: Literal["faces"] = "faces"
    photos: str
    name: str | None = None
    detector: Literal["haar", "yunet"] = "haar"
    model: str | None = None
    min_face: int = Field(64, ge=8)
    margin: float = Field(0.25, ge=0, le=1)
    part_size: int = Field(1000, ge=1)


class ImagesSource(_Strict):
    """An image folder tree (class subfolders) or table -> min-resized center crops."""

    type: Literal["images"] = "images"
    images: str
    name: str | None = None
    part_size: int = Field(5000, ge=1)


class ExtractSettings(_Strict):
    size: int = Field(64, ge=8, le=1024)
    part_size: int = Field(10_000, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    min_side: int | None = Field(None, ge=1, description="default: half the crop size")


class DedupSettings(_Strict):
    enabled: bool = True
    radius: int = Field(0, ge=0, le=63)
    autoencoder: str | None = None
    device: str = "cpu"
    max_epochs: int = Field(50, ge=1)


class ShardSettings(_Strict):
    maxcount: int = Field(10_000, ge=1)
    maxsize: int = Field(1 << 30, ge=1024)
    seed: int = 0


class TrainSettings(_Strict):
    enabled: bool = True
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    device: str = "auto"
    seed: int = 0
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    nz: int = Field(100, ge=1)
    ngf: int = Field(64, ge=1)
    ndf: int = Field(64, ge=1)
    discriminator: Literal["dcgan", "imagenet32"] = "dcgan"
    noise: Literal["uniform", "normal"] = "uniform"
    sample_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    loop: Literal["fast", "textbook"] = "fast"
    precision: Literal["bf16", "fp32"] = "bf16"
    channels_last: bool = True
    fused_adam: bool = True
    cuda_graphs: bool = True
    gpu_cache: bool = True
    cache_gb: float = Field(8.0, ge=0)
    workers: int = Field(2, ge=0)
    best_images: int = Field(512, ge=0)
    on_nan: Literal["rollback", "stop"] = "rollback"
    tensorboard: bool = True
    nproc_per_node: int = Field(1, ge=1)


class EvaluateSettings(_Strict):
    enabled: bool = True
    cifar10: str | None = None
    svhn: str | None = None
    inception: str | None = None  # local Inception weights for FID/KID (never downloaded)
    swd_images: int = Field(2048, ge=16)

    @field_validator("inception")
    @classmethod
    def _weights_file_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"no Inception weights file at {path} (nothing is downloaded)")
        return path


class PipelineConfig(_Strict):
    work: str
    sources: list[Annotated[LsunSource | DemoSource | FacesSource | ImagesSource, Field(discriminator="type")]] = Field(
        min_length=1
    )
    extract: ExtractSettings = ExtractSettings()
    dedup: DedupSettings = DedupSettings()
    shard: ShardSettings = ShardSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()


def load_config(path: str | Path) -> PipelineConfig:
    """Parse and validate a pipeline YAML file; errors name the offending field."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    try:
        return PipelineConfig.model_validate(yaml.safe_load(p.read_text()) or {})
    except ValidationError as exc:
        raise ValueError(f"invalid config {p}:\n{exc}") from exc


@task
def build_demo_source(work: str, records: int, seed: int) -> str:
    return str(build_demo_lmdb(Path(work) / "sources" / "demo_train_lmdb", records, seed))


@task
def write_pipeline_report(work: str) -> str:
    """Concatenate the stage reports into `work/report.md`."""
    reports = Path(work) / "reports"
    parts = [p.read_text() for p in sorted(reports.glob("extract-*.md"))]
    parts += [p.read_text() for p in [reports / "dedup.md", reports / "shards.md"] if p.exists()]
    parts += [p.read_text() for p in sorted(reports.glob("train-*.md"), key=lambda p: p.stat().st_mtime)[-1:]]
    parts += [p.read_text() for p in sorted(reports.glob("eval-*.md"), key=lambda p: p.stat().st_mtime)[-1:]]
    text = "\n\n".join(t.replace("](", "](reports/") for t in parts)
    path = Path(work) / "report.md"
    path.write_text(text)
    return str(path)


@flow(name="pipeline")
def pipeline_flow(config: str = "configs/demo.yaml", refresh: list[str] | None = None) -> dict:
    """Run every stage of the config in order; `refresh` names stages to redo from scratch."""
    cfg = load_config(config)
    refresh = refresh or []
    unknown = sorted(set(refresh) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages in refresh: {unknown}; choose from {STAGES}")
    if cfg.train.enabled and cfg.extract.size not in RESOLUTIONS:
        raise ValueError(f"training needs extract.size in {RESOLUTIONS}, got {cfg.extract.size}")
    ex = cfg.extract
    refresh_extract = "extract" in refresh
    extracted = []
    for src in cfg.sources:
        if isinstance(src, FacesSource):
            extracted.append(
                faces_flow(
                    src.photos,
                    cfg.work,
                    name=src.name,
                    detector=src.detector,
                    model=src.model,
                    min_face=src.min_face,
                    size=ex.size,
                    margin=src.margin,
                    part_size=src.part_size,
                    max_pixels=ex.max_pixels,
                    refresh=refresh_extract,
                )
            )
        elif isinstance(src, ImagesSource):
            extracted.append(
                ingest_flow(
                    src.images,
                    cfg.work,
                    name=src.name,
                    size=ex.size,
                    part_size=src.part_size,
                    max_pixels=ex.max_pixels,
                    refresh=refresh_extract,
                )
            )
        else:
            demo = isinstance(src, DemoSource)
            db = build_demo_source(cfg.work, src.records, src.seed) if demo else src.db
            name = "demo" if demo else src.name
            extracted += lsun_extract_flow(
                [db],
                cfg.work,
                size=ex.size,
                part_size=ex.part_size,
                names=[name] if name else None,
                max_pixels=ex.max_pixels,
                min_side=ex.min_side,
                refresh=refresh_extract,
            )
    deduped = None
    if cfg.dedup.enabled:
        dd = cfg.dedup
        deduped = dedup_flow(
            cfg.work,
            radius=dd.radius,
            autoencoder=dd.autoencoder,
            device=dd.device,
            max_epochs=dd.max_epochs,
            refresh="dedup" in refresh,
        )
    else:
        shutil.rmtree(Path(cfg.work) / "dedup", ignore_errors=True)  # stale keep flags must not filter shards
    shards = shard_flow(cfg.work, cfg.shard.maxcount, cfg.shard.maxsize, cfg.shard.seed, refresh="shard" in refresh)
    trained = None
    if cfg.train.enabled:
        t = cfg.train.model_dump(exclude={"enabled"})
        trained = train_flow(cfg.work, resolution=ex.size, **t)
    evaluated = None
    if trained is not None and cfg.evaluate.enabled:
        ev = cfg.evaluate
        evaluated = evaluate_flow(
            trained["run_dir"],
            ev.cifar10,
            ev.svhn,
            swd_images=ev.swd_images,
            device="cuda" if cfg.train.device.startswith("cuda") else "cpu",
            inception=ev.inception,
        )
    report = write_pipeline_report(cfg.work)
    return {
        "extract": extracted,
        "dedup": deduped,
        "shards": shards,
        "train": trained,
        "evaluate": evaluated,
        "report": report,
    }
