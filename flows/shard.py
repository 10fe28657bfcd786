"""Sharding flow: the clean set as shuffled WebDataset shards with a wids-style index."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.events import emit_event

from flows.caching import FileFingerprint
from flows.reports import publish
from flows.runtime import retry_unless_user_error, stage_lock
from preprocessing.locks import LockSettings
from preprocessing.markdown import table
from preprocessing.preview import grid_from_shards
from preprocessing.settings import ShardSettings
from preprocessing.sharding import build_shards

DATASET_UPDATED = "dcgan.dataset.updated"


def _shard_inputs(inputs: dict) -> list[Path]:
    work = Path(inputs["work"])
    return sorted(work.glob("extract/*/manifest.parquet")) + [work / "dedup" / "codes.parquet"]


def _shard_outputs(inputs: dict) -> list[Path]:
    return [Path(inputs["work"]) / "shards" / "index.json"]


@task(
    cache_policy=FileFingerprint(outputs=_shard_outputs, derived=_shard_inputs),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_unless_user_error,
)
def write_shards(
    work: str, settings: ShardSettings, rebuild: bool = False, lock: LockSettings = LockSettings()
) -> dict:
    t0 = time.perf_counter()
    index = build_shards(Path(work), settings, rebuild=rebuild, lock=lock)
    rate = index["total"] / max(time.perf_counter() - t0, 1e-9)
    md = "# Shards\n\n" + table(
        [
            ("version", index["version"]),
            ("samples", index["total"]),
            ("samples added by this version", index["added"]),
            ("shards", len(index["shardlist"])),
            ("resolution", index["resolution"]),
            ("seed", settings.seed),
            ("dedup keep flags", "honoured (when present)" if settings.dedup else "ignored"),
            ("throughput (samples/s)", f"{rate:.0f}"),
            ("fingerprint", index["fingerprint"][:16]),
        ],
        ("", "value"),
    )
    md += "\n## Samples per source\n\n" + table(sorted(index["sources"].items()), ("source", "samples"))
    shards = Path(work) / "shards"
    publish(Path(work), "shards", md, grid_from_shards([shards / index["shardlist"][0]["url"]]))
    return {
        "shards": str(shards),
        "total": index["total"],
        "count": len(index["shardlist"]),
        "resolution": index["resolution"],
        "version": index["version"],
        "added": index["added"],
    }


@flow(name="shard")
def shard_flow(
    work: str,
    settings: ShardSettings = ShardSettings(),
    refresh: bool = False,
    announce: bool = True,
    lock: LockSettings = LockSettings(),
) -> dict:
    """Write `work/shards/` from every extracted source (honouring dedup keep flags unless settings.dedup is off).

    A new version is announced as the event `dcgan.dataset.updated` (the pipeline passes
    `announce=False` and announces once it has finished, training included). Another shard
    writer makes this wait (or fail, with `lock.wait` off); so does a rebuild while a training
    reads the shards.
    """
    task_ = write_shards.with_options(refresh_cache=True) if refresh else write_shards
    with stage_lock(work, "shards", "sharding", lock):
        result = task_(work, settings, rebuild=refresh, lock=lock)
    if announce and result["added"]:
        announce_new_version(work, result)
    return result


def announce_new_version(work: str, result: dict) -> None:
    """Emit `dcgan.dataset.updated`: the retrain deployment's trigger (prefect.yaml) listens for it."""
    path = str(Path(work).resolve())
    emit_event(
        event=DATASET_UPDATED,
        resource={"prefect.resource.id": f"dcgan.work.{path}", "prefect.resource.name": path},
        payload={"work": path, "version": result["version"], "added": result["added"], "total": result["total"]},
    )
