"""Dedup flow: crops -> autoencoder -> 128-bit codes -> groups and keep flags, with a report.

Each step is a task cached on the fingerprints of the files it reads and writes, so
changing the grouping settings (radius, threshold) regroups without retraining, and a new extraction retrains.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dcgan.train import resolve_device
from dedup.settings import DedupSettings
from dedup.stage import (
    DedupError,
    clear_for_refresh,
    collect_crops,
    dedup_dir,
    encode_items,
    group_items,
    prepare_autoencoder,
)
from flows.caching import FileFingerprint
from flows.reports import publish
from flows.runtime import retry_unless_user_error, stage_lock
from preprocessing.atomic import atomic_write_bytes
from preprocessing.locks import LockSettings
from preprocessing.sharding import extracted_sources


def _outs(*names: str):  # noqa: ANN202
    return lambda inputs: [dedup_dir(Path(inputs["work"])) / n for n in names]


def _extract_manifests(inputs: dict) -> list[Path]:
    return sorted(Path(inputs["work"]).glob("extract/*/manifest.parquet"))


_POLICY = {"persist_result": True, "retries": 1, "retry_condition_fn": retry_unless_user_error}
PACKAGES = ("preprocessing", "dedup")


def check_dedup(work: str, settings: DedupSettings) -> None:
    """Fail before any work: something extracted to deduplicate, and the device exists here."""
    if not extracted_sources(Path(work)):
        raise DedupError(f"no extracted data under {Path(work) / 'extract'}: run an extraction stage first")
    resolve_device(settings.device)


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("crops32.npy", "items.parquet"), derived=_extract_manifests, packages=PACKAGES
    ),
    **_POLICY,
)
def collect(work: str, full: bool) -> int:
    return collect_crops(Path(work), full=full)


@task(
    cache_policy=FileFingerprint(outputs=_outs("autoencoder.pt"), derived=_outs("crops32.npy"), packages=PACKAGES),
    **_POLICY,
)
def fit(work: str, settings: DedupSettings, retrain: bool) -> tuple[str, dict | None]:
    checkpoint, info = prepare_autoencoder(Path(work), settings, retrain=retrain)
    return str(checkpoint), info


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("hashes.parquet", "thumbs16.npy"),
        paths=("checkpoint",),
        derived=_outs("crops32.npy"),
        packages=PACKAGES,
    ),
    **_POLICY,
)
def encode(work: str, checkpoint: str) -> float:
    return encode_items(Path(work), Path(checkpoint))


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("codes.parquet", "report.md"),
        derived=_outs("hashes.parquet", "thumbs16.npy"),
        packages=PACKAGES,
    ),
    **_POLICY,
)
def regroup(work: str, settings: DedupSettings, full: bool) -> dict:
    summary = group_items(Path(work), settings, full=full)
    out = dedup_dir(Path(work))
    sheet, update = out / "collisions.png", out / "new_vs_existing.png"
    md = (out / "report.md").read_text().replace("\n![collisions](collisions.png)", "")
    if update.exists():  # the stage report lives in WORK/reports: the figure goes there too
        reports = Path(work) / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(reports / "dedup-new-vs-existing.png", update.read_bytes())
        md = md.replace("](new_vs_existing.png)", "](dedup-new-vs-existing.png)")
    publish(Path(work), "dedup", md, sheet.read_bytes() if sheet.exists() else None)
    return summary


@flow(name="dedup")
def dedup_flow(
    work: str, settings: DedupSettings = DedupSettings(), refresh: bool = False, lock: LockSettings = LockSettings()
) -> dict:
    """Hash every extracted item with the paper's autoencoder and flag near duplicates.

    A work directory that grew is deduplicated incrementally: the trained hash is reused, only new
    items are encoded, and they are grouped against the items kept before, which stay kept.
    `settings.autoencoder` loads a trained checkpoint instead of training one; `refresh` redoes
    every step from scratch (a full re-dedup: kept items may change). Another dedup of this work
    directory makes it wait (or fail, with `lock.wait` off).
    """
    check_dedup(work, settings)
    with stage_lock(work, "dedup", "dedup", lock):
        if refresh:
            clear_for_refresh(Path(work))
        opts = {"refresh_cache": True} if refresh else {}
        collect.with_options(**opts)(work, refresh)
        fit_task = fit if settings.autoencoder is None else fit.with_options(cache_policy=NO_CACHE)
        checkpoint, info = fit_task.with_options(**opts)(work, settings, refresh)
        rate = encode.with_options(**opts)(work, checkpoint)
        summary = regroup.with_options(**opts)(work, settings, refresh)
    return {**summary, "hash_items_per_s": rate, "autoencoder": checkpoint, "training": info}
