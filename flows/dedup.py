"""Dedup flow: crops -> autoencoder -> 128-bit codes -> groups and keep flags, with a report.

Each step is a task cached on the fingerprints of the files it reads and writes, so
changing the radius regroups without retraining, and a new extraction retrains.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from dedup.autoencoder import AEConfig
from dedup.stage import collect_crops, dedup_dir, encode_items, fit_autoencoder, group_items
from flows.caching import FileFingerprint
from flows.reports import publish


def _outs(*names: str):  # noqa: ANN202
    return lambda inputs: [dedup_dir(Path(inputs["work"])) / n for n in names]


def _extract_manifests(inputs: dict) -> list[Path]:
    return sorted(Path(inputs["work"]).glob("extract/*/manifest.parquet"))


_POLICY = {"persist_result": True, "retries": 1}
PACKAGES = ("preprocessing", "dedup")


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("crops32.npy", "items.parquet"), derived=_extract_manifests, packages=PACKAGES
    ),
    **_POLICY,
)
def collect(work: str) -> int:
    return collect_crops(Path(work))


@task(
    cache_policy=FileFingerprint(outputs=_outs("autoencoder.pt"), derived=_outs("crops32.npy"), packages=PACKAGES),
    **_POLICY,
)
def fit(work: str, config: dict) -> dict:
    return fit_autoencoder(Path(work), AEConfig(**config))


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("hashes.parquet"), paths=("checkpoint",), derived=_outs("crops32.npy"), packages=PACKAGES
    ),
    **_POLICY,
)
def encode(work: str, checkpoint: str) -> float:
    return encode_items(Path(work), Path(checkpoint))


@task(
    cache_policy=FileFingerprint(
        outputs=_outs("codes.parquet", "report.md"), derived=_outs("hashes.parquet"), packages=PACKAGES
    ),
    **_POLICY,
)
def regroup(work: str, radius: int) -> dict:
    summary = group_items(Path(work), radius)
    out = dedup_dir(Path(work))
    sheet = out / "collisions.png"
    md = (out / "report.md").read_text().replace("\n![collisions](collisions.png)", "")
    publish(Path(work), "dedup", md, sheet.read_bytes() if sheet.exists() else None)
    return summary


@flow(name="dedup")
def dedup_flow(
    work: str,
    radius: int = 0,
    autoencoder: str | None = None,
    device: str = "cpu",
    max_epochs: int = 50,
    seed: int = 0,
    refresh: bool = False,
) -> dict:
    """Hash every extracted item with the paper's autoencoder and flag near duplicates.

    `autoencoder` loads a trained checkpoint instead of training one; `refresh` redoes every step.
    """
    if not 0 <= radius < 64:
        raise ValueError(f"radius must be between 0 and 63, got {radius}")
    opts = {"refresh_cache": True} if refresh else {}
    collect.with_options(**opts)(work)
    info = None
    checkpoint = autoencoder
    if checkpoint is None:
        config = AEConfig(device=device, max_epochs=max_epochs, seed=seed).__dict__
        info = fit.with_options(**opts)(work, config)
        checkpoint = str(dedup_dir(Path(work)) / "autoencoder.pt")
    rate = encode.with_options(**opts)(work, checkpoint)
    summary = regroup.with_options(**opts)(work, radius)
    return {**summary, "hash_items_per_s": rate, "autoencoder": checkpoint, "training": info}
