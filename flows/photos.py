"""Photo stages as flows: face crops from scraped photos, and ImageNet-style 32 px ingestion."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped

from flows.caching import PART_TASK
from flows.reports import part_totals, publish, rejects_section
from flows.runners import check_runner, task_runner
from flows.runtime import api_shared_with_subprocesses, retry_unless_user_error, stage_lock
from preprocessing.extraction import ExtractionPlan, manifest_counts, summarize_plan
from preprocessing.locks import LockSettings
from preprocessing.markdown import table
from preprocessing.photo_stages import merge_photo_manifests, prepare_photo_stage, run_photo_part
from preprocessing.photos import open_source
from preprocessing.preview import grid_from_shards
from preprocessing.settings import FacesSettings, IngestSettings, RunnerSettings


def default_name(photos: str, prefix: str) -> str:
    """`/data/celeba-6k.parquet` -> `faces_celeba-6k`: the source name used for keys and folders."""
    stem = Path(photos).name.split(".")[0] or "photos"
    return f"{prefix}_" + re.sub(r"[^A-Za-z0-9_\-]", "_", stem)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def plan_photos(
    photos: str, work: str, name: str, settings: FacesSettings | IngestSettings, refresh: bool
) -> tuple[str, dict]:
    """Index the photos and plan parts (new photos in new parts); `refresh` removes the earlier extraction."""
    if refresh:
        shutil.rmtree(Path(work) / "extract" / name, ignore_errors=True)
    out_dir, plan = prepare_photo_stage(photos, Path(work), name, settings)
    return str(out_dir), asdict(plan)


@task(**PART_TASK)
def photo_part(out_dir: str, part: int) -> dict:
    return run_photo_part(Path(out_dir), part)


@flow(name="photo-parts")
def photo_parts(out_dir: str, parts: list[int], refresh: bool) -> list[dict]:
    """The parts to do, one task each, on the stage's task runner."""
    task_ = photo_part.with_options(refresh_cache=True) if refresh else photo_part
    return task_.map(unmapped(out_dir), parts).result()


@task
def merge_photos(out_dir: str, plan: dict, summaries: list[dict], wall: float, title: str) -> dict:
    """Merge part manifests and publish the stage report (with what this rerun added, reused and lost)."""
    counts = manifest_counts(merge_photo_manifests(Path(out_dir)), "photo_key")
    photos, ok, gone = counts["inputs"], counts["ok"], counts["gone"]
    rejected = counts["rejected"]
    _, resumed, rate = part_totals(summaries, "inputs", wall)
    steps = ExtractionPlan(**plan)
    source = Path(out_dir).name
    md = f"# {title}: {source}\n\n" + table(
        [
            ("photos", photos),
            ("crops kept", ok),
            ("manifest rows", counts["rows"]),
            ("photos gone from the collection", gone),
            ("parts", steps.parts),
            *summarize_plan(steps),
            ("parts resumed from disk", resumed),
            ("throughput (photos/s)", f"{rate:.1f}"),
        ],
        ("", "value"),
    )
    md += rejects_section(rejected)
    publish(
        Path(out_dir).parents[1], f"extract-{source}", md, grid_from_shards(sorted(Path(out_dir).glob("part-*.tar")))
    )
    get_run_logger().info(
        "%s: %d photos (%d new) -> %d crops, rejected %s, %d gone, %.1f photos/s",
        source,
        photos,
        steps.new_inputs,
        ok,
        rejected,
        gone,
        rate,
    )
    return {
        "source": source,
        "out_dir": out_dir,
        "photos": photos,
        "ok": ok,
        "gone": gone,
        "new": steps.new_inputs,
        "rejected": rejected,
        "photos_per_s": rate,
    }


def _run_stage(
    photos: str,
    work: str,
    name: str,
    settings: FacesSettings | IngestSettings,
    refresh: bool,
    title: str,
    runner: RunnerSettings,
    lock: LockSettings,
) -> dict:
    open_source(photos)  # a clear error for a missing or unreadable collection, before any work
    model = [settings.model] if isinstance(settings, FacesSettings) and settings.model else []  # the YuNet file
    check_runner(runner, [photos, *model], work)
    with stage_lock(work, f"extract-{name}", f"extraction of {name}", lock):
        out_dir, plan = plan_photos(photos, work, name, settings, refresh)
        t0 = time.perf_counter()
        with api_shared_with_subprocesses():
            parts_flow = photo_parts.with_options(task_runner=task_runner(runner))
            get_run_logger().info("parts run on the %s", runner.describe())
            summaries = parts_flow(out_dir, plan["todo"], refresh) if plan["todo"] else []
        return merge_photos(out_dir, plan, summaries, time.perf_counter() - t0, title)


@flow(name="faces")
def faces_flow(
    photos: str,
    work: str,
    settings: FacesSettings = FacesSettings(),
    name: str | None = None,
    refresh: bool = False,
    runner: RunnerSettings = RunnerSettings(),
    lock: LockSettings = LockSettings(),
) -> dict:
    """Detect faces in a folder, tar or Parquet table of photos; keep square crops of faces >= min_face px.

    Parts run on `runner` (a local process pool, or a Dask cluster). Another writer of this
    source makes it wait, or fail with `lock.wait` off.
    """
    name = name or default_name(photos, "faces")
    return _run_stage(photos, work, name, settings, refresh, "Faces", runner, lock)


@flow(name="ingest")
def ingest_flow(
    images: str,
    work: str,
    settings: IngestSettings = IngestSettings(),
    name: str | None = None,
    refresh: bool = False,
    runner: RunnerSettings = RunnerSettings(),
    lock: LockSettings = LockSettings(),
) -> dict:
    """Min-resize + center-crop a folder tree (class subfolders = labels) or image table, parts on `runner`."""
    name = name or default_name(images, "images")
    return _run_stage(images, work, name, settings, refresh, "Ingestion", runner, lock)
