"""The full DAG from one YAML config: sources -> extraction -> dedup -> shards -> training -> evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow, task

from dcgan.settings import EvaluateSettings, TrainSettings
from dcgan.train import resolve_device
from dedup.settings import DedupSettings
from flows.config import (
    STAGES,
    DemoSource,
    FacesSource,
    ImagesSource,
    LsunSource,
    PipelineConfig,
    load_config,
    stage_settings,
)
from flows.dedup import dedup_flow
from flows.evaluate import evaluate_flow
from flows.lsun import check_lsun, lsun_extract_flow
from flows.photos import faces_flow, ingest_flow
from flows.progress import follow_subflows
from flows.reports import stage_markdown
from flows.runners import check_runner
from flows.shard import announce_new_version, shard_flow
from flows.train import report_skipped_training, train_flow, trained_already
from preprocessing.atomic import atomic_write_bytes
from preprocessing.demo_data import build_demo_lmdb
from preprocessing.photo_stages import face_plan
from preprocessing.photos import open_source
from preprocessing.settings import FacesSettings, IngestSettings, SettingsError


def check_pipeline(cfg: PipelineConfig, refresh: list[str]) -> None:
    """What the config alone cannot tell, checked on the machine that runs it before the first stage."""
    unknown = sorted(set(refresh) - set(STAGES))
    if unknown:
        raise SettingsError(f"unknown stages in refresh: {unknown}; choose from {STAGES}")
    inputs: list[str] = []  # what the runner's workers must see (a Dask cluster: at the same paths)
    for src in cfg.sources:
        if isinstance(src, LsunSource):
            check_lsun([src.db], None)
            inputs.append(src.db)
        elif isinstance(src, FacesSource | ImagesSource):
            inputs.append(src.photos if isinstance(src, FacesSource) else src.images)
            open_source(inputs[-1])
        if isinstance(src, FacesSource):
            face_plan(stage_settings(FacesSettings, src))  # the detector (and its model file) loads
    for section in (cfg.dedup, cfg.train, cfg.evaluate):
        if section.enabled:
            resolve_device(section.device)
    check_runner(cfg.runner, inputs, cfg.work)


@task
def build_demo_source(work: str, records: int, seed: int) -> str:
    return str(build_demo_lmdb(Path(work) / "sources" / "demo_train_lmdb", records, seed))


def _lsun(cfg: PipelineConfig, src: LsunSource, refresh: bool) -> list[dict]:
    names = [src.name] if src.name else None
    return lsun_extract_flow(
        [src.db], cfg.work, cfg.extract, names=names, refresh=refresh, runner=cfg.runner, lock=cfg.lock
    )


def _demo(cfg: PipelineConfig, src: DemoSource, refresh: bool) -> list[dict]:
    db = build_demo_source(cfg.work, src.records, src.seed)
    return lsun_extract_flow(
        [db], cfg.work, cfg.extract, names=["demo"], refresh=refresh, runner=cfg.runner, lock=cfg.lock
    )


def _faces(cfg: PipelineConfig, src: FacesSource, refresh: bool) -> list[dict]:
    settings = stage_settings(FacesSettings, src)
    return [
        faces_flow(src.photos, cfg.work, settings, name=src.name, refresh=refresh, runner=cfg.runner, lock=cfg.lock)
    ]


def _images(cfg: PipelineConfig, src: ImagesSource, refresh: bool) -> list[dict]:
    settings = stage_settings(IngestSettings, src)
    return [
        ingest_flow(src.images, cfg.work, settings, name=src.name, refresh=refresh, runner=cfg.runner, lock=cfg.lock)
    ]


# Source type -> the stage that extracts it (a new kind of source is one entry here and one model in config.py).
SOURCE_STAGES: dict[str, Callable[..., list[dict]]] = {"lsun": _lsun, "demo": _demo, "faces": _faces, "images": _images}


@task
def write_pipeline_report(work: str, names: list[str]) -> str:
    """`work/report.md`: the stage reports of this run only, in DAG order."""
    path = Path(work) / "report.md"
    atomic_write_bytes(path, "\n\n".join(stage_markdown(Path(work), n) for n in names).encode())
    return str(path)


@flow(name="pipeline")
def pipeline_flow(config: str = "configs/demo.yaml", refresh: list[str] | None = None) -> dict:
    """Run every stage of the config in order; `refresh` names stages to redo from scratch.

    Training (and its evaluation) is skipped when a registered run already trained on the
    current shard version with the same training settings (see `trained_already`); the report
    says which run. `refresh: [train]` trains anyway.
    """
    follow_subflows()  # the stages' logs on this run too, where `prefect deployment run --watch` shows them
    cfg = load_config(config)
    refresh = refresh or []
    check_pipeline(cfg, refresh)
    extracted: list[dict] = []
    for src in cfg.sources:
        extracted += SOURCE_STAGES[src.type](cfg, src, "extract" in refresh)
    reports = [f"extract-{r['source']}" for r in extracted]
    deduped = None
    if cfg.dedup.enabled:
        dedup_settings = stage_settings(DedupSettings, cfg.dedup)
        deduped = dedup_flow(cfg.work, dedup_settings, refresh="dedup" in refresh, lock=cfg.lock)
        reports.append("dedup")
    shard_settings = cfg.shard.model_copy(update={"dedup": cfg.shard.dedup and cfg.dedup.enabled})
    shards = shard_flow(cfg.work, shard_settings, refresh="shard" in refresh, announce=False, lock=cfg.lock)
    reports.append("shards")
    trained = evaluated = None
    if cfg.train.enabled:
        train_settings = stage_settings(TrainSettings, cfg.train)
        done = None if "train" in refresh else trained_already(cfg.work, train_settings)
        if done is not None:  # the same shards and settings: training again would make that run again
            trained = report_skipped_training(cfg.work, done)
            reports.append("training-skipped")
        else:
            trained = train_flow(cfg.work, train_settings, lock=cfg.lock)
            reports.append(f"train-{Path(trained['run_dir']).name}")
        if cfg.evaluate.enabled and done is None:
            evaluated = evaluate_flow(trained["run_dir"], stage_settings(EvaluateSettings, cfg.evaluate))
            reports.append(f"eval-{Path(trained['run_dir']).name}")
    if shards and shards["added"]:
        announce_new_version(cfg.work, shards)  # after training: a retrain it triggers finds this run registered
    return {
        "extract": extracted,
        "dedup": deduped,
        "shards": shards,
        "train": trained,
        "evaluate": evaluated,
        "report": write_pipeline_report(cfg.work, reports),
    }
