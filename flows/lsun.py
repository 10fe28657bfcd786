"""LSUN extraction flow: plan key ranges, map one task per range over processes, merge, report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner

from flows.caching import FileFingerprint
from flows.reports import part_totals, publish, rejects_section, table
from flows.runtime import api_shared_with_subprocesses
from preprocessing.images import DEFAULT_MAX_PIXELS
from preprocessing.lsun import (
    Partition,
    default_min_side,
    extract_partition,
    prepare_extraction,
    resolve_db,
    source_name,
)
from preprocessing.manifest import merge_part_manifests
from preprocessing.preview import grid_from_shards


def _part_outputs(inputs: dict) -> list[Path]:
    stem = Partition(**inputs["part"]).stem
    return [Path(inputs["out_dir"]) / f"{stem}.parquet", Path(inputs["out_dir"]) / f"{stem}.tar"]


def _part_db(inputs: dict) -> list[Path]:
    return [Path(inputs["part"]["db"]) / "data.mdb"]


@task(retries=2, retry_delay_seconds=2)
def plan_lsun(
    db: str, work: str, size: int, part_size: int, name: str | None, max_pixels: int, min_side: int, refresh: bool
) -> tuple[str, list[dict]]:
    """Plan key ranges; with `refresh`, first remove this source's earlier extraction."""
    if refresh:
        stale = Path(work) / "extract" / (name or source_name(resolve_db(db)))
        shutil.rmtree(stale, ignore_errors=True)
    out_dir, parts = prepare_extraction(
        db, Path(work), size, part_size=part_size, name=name, max_pixels=max_pixels, min_side=min_side
    )
    return str(out_dir), [p.__dict__ for p in parts]


@task(cache_policy=FileFingerprint(outputs=_part_outputs, derived=_part_db), persist_result=True, retries=1)
def extract_lsun_part(part: dict, out_dir: str, size: int, max_pixels: int, min_side: int) -> dict:
    return extract_partition(Partition(**part), Path(out_dir), size, max_pixels=max_pixels, min_side=min_side)


@task
def merge_lsun(out_dir: str, summaries: list[dict], wall: float) -> dict:
    """Merge part manifests and publish the stage report."""
    merged = merge_part_manifests(Path(out_dir), len(summaries))
    total = merged.num_rows
    ok = sum(s["ok"] for s in summaries)
    rejected, resumed, rate = part_totals(summaries, "total", wall)
    source = Path(out_dir).name
    md = f"# LSUN extraction: {source}\n\n" + table(
        [
            ("records", total),
            ("ok", ok),
            ("rejected", total - ok),
            ("parts", len(summaries)),
            ("parts resumed from disk", resumed),
            ("throughput (img/s)", f"{rate:.0f}"),
        ],
        ("", "value"),
    )
    md += rejects_section(rejected)
    grid = grid_from_shards(sorted(Path(out_dir).glob("part-*.tar")))
    publish(Path(out_dir).parents[1], f"extract-{source}", md, grid)
    get_run_logger().info("%s: %d records, %d ok, rejected %s, %.0f img/s", source, total, ok, rejected, rate)
    return {"source": source, "out_dir": out_dir, "total": total, "ok": ok, "rejected": rejected, "img_per_s": rate}


@flow(name="lsun-extract", task_runner=ProcessPoolTaskRunner())
def lsun_extract_flow(
    db: list[str],
    work: str,
    size: int = 64,
    part_size: int = 10_000,
    names: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
    refresh: bool = False,
) -> list[dict]:
    """Extract center crops of `size` px from LSUN LMDBs into `work/extract/<source>/`.

    Parts run on a process pool of one worker per core (PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS
    overrides); on a Dask or Ray cluster, pass that task runner with `lsun_extract_flow.with_options`.
    """
    if not db:
        raise ValueError("give at least one LSUN database path")
    if names is not None and len(names) != len(db):
        raise ValueError("names must give one source name per database")
    for path in db:  # fail fast, before any work is scheduled
        resolve_db(path)
    min_side = min_side or default_min_side(size)
    results = []
    for i, path in enumerate(db):
        out_dir, parts = plan_lsun(
            path, work, size, part_size, names[i] if names else None, max_pixels, min_side, refresh
        )
        t0 = time.perf_counter()
        task_ = extract_lsun_part.with_options(refresh_cache=True) if refresh else extract_lsun_part
        with api_shared_with_subprocesses():
            futures = task_.map(parts, unmapped(out_dir), unmapped(size), unmapped(max_pixels), unmapped(min_side))
            summaries = futures.result()
        results.append(merge_lsun(out_dir, summaries, time.perf_counter() - t0))
    return results
