"""LSUN extraction flow: plan parts (new keys in new parts), map one task per part to do, merge, report."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped

from flows.caching import PART_TASK
from flows.reports import part_totals, publish, rejects_section
from flows.runners import check_runner, task_runner
from flows.runtime import api_shared_with_subprocesses, retry_unless_user_error, stage_lock
from preprocessing.extraction import ExtractionPlan, manifest_counts, merge_manifests, summarize_plan
from preprocessing.locks import LockSettings
from preprocessing.lsun import LsunError, LsunKind, extract_partition, prepare_extraction, resolve_db, source_name
from preprocessing.markdown import table
from preprocessing.preview import grid_from_shards
from preprocessing.settings import LsunSettings, RunnerSettings


def check_lsun(db: list[str], names: list[str] | None) -> None:
    """Fail before any work is scheduled: every path an LMDB, one name per database if names are given."""
    if not db:
        raise LsunError("give at least one LSUN database path")
    if names is not None and len(names) != len(db):
        raise LsunError("names must give one source name per database")
    for path in db:
        resolve_db(path)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def plan_lsun(db: str, work: str, settings: LsunSettings, name: str | None, refresh: bool) -> tuple[str, dict]:
    """Plan parts (new keys in new parts); with `refresh`, first remove this source's earlier extraction."""
    if refresh:
        shutil.rmtree(Path(work) / "extract" / (name or source_name(resolve_db(db))), ignore_errors=True)
    out_dir, plan = prepare_extraction(db, Path(work), settings, name=name)
    return str(out_dir), asdict(plan)


@task(**PART_TASK)
def extract_lsun_part(part: int, out_dir: str, settings: LsunSettings) -> dict:
    return extract_partition(Path(out_dir), part, settings)


@flow(name="lsun-extract-parts")
def extract_lsun_parts(parts: list[int], out_dir: str, settings: LsunSettings, refresh: bool) -> list[dict]:
    """The parts to do, one task each, on the stage's task runner (see `lsun_extract_flow`)."""
    task_ = extract_lsun_part.with_options(refresh_cache=True) if refresh else extract_lsun_part
    return task_.map(parts, unmapped(out_dir), unmapped(settings)).result()


@task
def merge_lsun(out_dir: str, db: str, settings: LsunSettings, plan: dict, summaries: list[dict], wall: float) -> dict:
    """Merge part manifests and publish the stage report (with what this rerun added, reused and lost)."""
    out = Path(out_dir)
    counts = manifest_counts(merge_manifests(out, LsunKind(str(resolve_db(db)), out.name, settings)), "key")
    _, resumed, rate = part_totals(summaries, "inputs", wall)
    steps = ExtractionPlan(**plan)
    total, ok, gone = counts["inputs"], counts["ok"], counts["gone"]
    md = f"# LSUN extraction: {out.name}\n\n" + table(
        [
            ("records", total),
            ("ok", ok),
            ("rejected", total - ok - gone),
            ("gone from the database", gone),
            ("parts", steps.parts),
            *summarize_plan(steps),
            ("parts resumed from disk", resumed),
            ("throughput (img/s)", f"{rate:.0f}"),
        ],
        ("", "value"),
    )
    md += rejects_section(counts["rejected"])
    grid = grid_from_shards(sorted(out.glob("part-*.tar")))
    publish(out.parents[1], f"extract-{out.name}", md, grid)
    get_run_logger().info(
        "%s: %d records (%d new), %d ok, rejected %s, %d gone, %.0f img/s",
        out.name,
        total,
        steps.new_inputs,
        ok,
        counts["rejected"],
        gone,
        rate,
    )
    return {
        "source": out.name,
        "out_dir": out_dir,
        "total": total,
        "ok": ok,
        "gone": gone,
        "new": steps.new_inputs,
        "rejected": counts["rejected"],
        "img_per_s": rate,
    }


@flow(name="lsun-extract")
def lsun_extract_flow(
    db: list[str],
    work: str,
    settings: LsunSettings = LsunSettings(),
    names: list[str] | None = None,
    refresh: bool = False,
    runner: RunnerSettings = RunnerSettings(),
    lock: LockSettings = LockSettings(),
) -> list[dict]:
    """Extract center crops from LSUN LMDBs into `work/extract/<source>/`; a rerun extracts only new keys.

    Parts run on `runner`: a process pool of one worker per core (the default;
    PREFECT_TASKS_RUNNER_PROCESS_POOL_MAX_WORKERS overrides) or a Dask cluster. Each source is
    written under its lock: another writer of it makes this wait (or fail, with `lock.wait` off).
    """
    check_lsun(db, names)
    check_runner(runner, db, work)
    parts_flow = extract_lsun_parts.with_options(task_runner=task_runner(runner))
    get_run_logger().info("parts run on the %s", runner.describe())
    results = []
    for i, path in enumerate(db):
        name = names[i] if names else source_name(resolve_db(path))
        with stage_lock(work, f"extract-{name}", f"extraction of {name}", lock):
            out_dir, plan = plan_lsun(path, work, settings, name, refresh)
            t0 = time.perf_counter()
            with api_shared_with_subprocesses():
                summaries = parts_flow(plan["todo"], out_dir, settings, refresh) if plan["todo"] else []
            results.append(merge_lsun(out_dir, path, settings, plan, summaries, time.perf_counter() - t0))
    return results
