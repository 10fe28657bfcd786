"""LSUN extraction flow: plan key ranges, map one task per range over processes, merge, report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner

from flows.caching import FileFingerprint
from flows.reports import part_totals, publish, rejects_section
from flows.runtime import api_shared_with_subprocesses, retry_unless_user_error
from preprocessing.lsun import LsunError, Partition, extract_partition, prepare_extraction, resolve_db, source_name
from preprocessing.manifest import merge_part_manifests
from preprocessing.markdown import table
from preprocessing.preview import grid_from_shards
from preprocessing.settings import LsunSettings


def _part_outputs(inputs: dict) -> list[Path]:
    stem = Partition(**inputs["part"]).stem
    return [Path(inputs["out_dir"]) / f"{stem}.parquet", Path(inputs["out_dir"]) / f"{stem}.tar"]


def _part_db(inputs: dict) -> list[Path]:
    return [Path(inputs["part"]["db"]) / "data.mdb"]


def check_lsun(db: list[str], names: list[str] | None) -> None:
    """Fail before any work is scheduled: every path an LMDB, one name per database if names are given."""
    if not db:
        raise LsunError("give at least one LSUN database path")
    if names is not None and len(names) != len(db):
        raise LsunError("names must give one source name per database")
    for path in db:
        resolve_db(path)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def plan_lsun(db: str, work: str, settings: LsunSettings, name: str | None, refresh: bool) -> tuple[str, list[dict]]:
    """Plan key ranges; with `refresh`, first remove this source's earlier extraction."""
    if refresh:
        shutil.rmtree(Path(work) / "extract" / (name or source_name(resolve_db(db))), ignore_errors=True)
    out_dir, parts = prepare_extraction(db, Path(work), settings, name=name)
    return str(out_dir), [p.__dict__ for p in parts]


@task(
    cache_policy=FileFingerprint(outputs=_part_outputs, derived=_part_db),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_unless_user_error,
)
def extract_lsun_part(part: dict, out_dir: str, settings: LsunSettings) -> dict:
    return extract_partition(Partition(**part), Path(out_dir), settings)


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
    settings: LsunSettings = LsunSettings(),
    names: list[str] | None = None,
    refresh: bool = False,
) -> list[dict]:
    """Extract center crops from LSUN LMDBs into `work/extract/<source>/`.

    Parts run on a process pool of one worker per core (PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS
    overrides); on a Dask or Ray cluster, pass that task runner with `lsun_extract_flow.with_options`.
    """
    check_lsun(db, names)
    results = []
    for i, path in enumerate(db):
        out_dir, parts = plan_lsun(path, work, settings, names[i] if names else None, refresh)
        t0 = time.perf_counter()
        task_ = extract_lsun_part.with_options(refresh_cache=True) if refresh else extract_lsun_part
        with api_shared_with_subprocesses():
            summaries = task_.map(parts, unmapped(out_dir), unmapped(settings)).result()
        results.append(merge_lsun(out_dir, summaries, time.perf_counter() - t0))
    return results
