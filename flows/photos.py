"""Photo stages as flows: face crops from scraped photos, and ImageNet-style 32 px ingestion."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner

from flows.caching import FileFingerprint
from flows.reports import part_totals, publish, rejects_section
from flows.runtime import api_shared_with_subprocesses, retry_unless_user_error
from preprocessing.markdown import table
from preprocessing.photo_stages import STAGES, merge_photo_manifests, prepare_photo_stage, run_photo_part
from preprocessing.photos import open_source
from preprocessing.preview import grid_from_shards
from preprocessing.settings import FacesSettings, IngestSettings


def default_name(photos: str, prefix: str) -> str:
    """`/data/celeba-6k.parquet` -> `faces_celeba-6k`: the source name used for keys and folders."""
    stem = Path(photos).name.split(".")[0] or "photos"
    return f"{prefix}_" + re.sub(r"[^A-Za-z0-9_\-]", "_", stem)


def _part_outputs(inputs: dict) -> list[Path]:
    stem = f"part-{inputs['part']:06d}"
    return [Path(inputs["out_dir"]) / f"{stem}.parquet", Path(inputs["out_dir"]) / f"{stem}.tar"]


def _part_inputs(inputs: dict) -> list[Path]:
    return [Path(inputs["out_dir"]) / "plan.json", Path(inputs["out_dir"]) / "inputs.parquet"]


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def plan_photos(
    photos: str, work: str, name: str, settings: FacesSettings | IngestSettings, refresh: bool
) -> tuple[str, int]:
    if refresh:
        shutil.rmtree(Path(work) / "extract" / name, ignore_errors=True)
    out_dir, parts = prepare_photo_stage(photos, Path(work), name, settings)
    return str(out_dir), parts


@task(
    cache_policy=FileFingerprint(outputs=_part_outputs, derived=_part_inputs),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_unless_user_error,
)
def photo_part(out_dir: str, part: int, stage: str) -> dict:
    return run_photo_part(Path(out_dir), part, STAGES[stage])


@task
def merge_photos(out_dir: str, summaries: list[dict], wall: float, title: str) -> dict:
    merged = merge_photo_manifests(Path(out_dir))
    photos = sum(s["photos"] for s in summaries)
    ok = sum(s["ok"] for s in summaries)
    rejected, resumed, rate = part_totals(summaries, "photos", wall)
    source = Path(out_dir).name
    md = f"# {title}: {source}\n\n" + table(
        [
            ("photos", photos),
            ("crops kept", ok),
            ("manifest rows", merged.num_rows),
            ("parts", len(summaries)),
            ("parts resumed from disk", resumed),
            ("throughput (photos/s)", f"{rate:.1f}"),
        ],
        ("", "value"),
    )
    md += rejects_section(rejected)
    publish(
        Path(out_dir).parents[1], f"extract-{source}", md, grid_from_shards(sorted(Path(out_dir).glob("part-*.tar")))
    )
    get_run_logger().info("%s: %d photos -> %d crops, rejected %s, %.1f photos/s", source, photos, ok, rejected, rate)
    return {
        "source": source,
        "out_dir": out_dir,
        "photos": photos,
        "ok": ok,
        "rejected": rejected,
        "photos_per_s": rate,
    }


def _run_stage(
    photos: str, work: str, name: str, settings: FacesSettings | IngestSettings, refresh: bool, stage: str, title: str
) -> dict:
    open_source(photos)  # a clear error for a missing or unreadable collection, before any work
    out_dir, parts = plan_photos(photos, work, name, settings, refresh)
    t0 = time.perf_counter()
    task_ = photo_part.with_options(refresh_cache=True) if refresh else photo_part
    with api_shared_with_subprocesses():
        summaries = task_.map(unmapped(out_dir), list(range(parts)), unmapped(stage)).result()
    return merge_photos(out_dir, summaries, time.perf_counter() - t0, title)


@flow(name="faces", task_runner=ProcessPoolTaskRunner())
def faces_flow(
    photos: str, work: str, settings: FacesSettings = FacesSettings(), name: str | None = None, refresh: bool = False
) -> dict:
    """Detect faces in a folder, tar or Parquet table of photos; keep square crops of faces >= min_face px."""
    return _run_stage(photos, work, name or default_name(photos, "faces"), settings, refresh, "faces", "Faces")


@flow(name="ingest", task_runner=ProcessPoolTaskRunner())
def ingest_flow(
    images: str, work: str, settings: IngestSettings = IngestSettings(), name: str | None = None, refresh: bool = False
) -> dict:
    """Min-resize + center-crop a folder tree (class subfolders = labels) or image table."""
    return _run_stage(images, work, name or default_name(images, "images"), settings, refresh, "ingest", "Ingestion")
