"""Final WebDataset shards: every kept item of every extracted source, shuffled with a seed.

Reads `work/extract/<source>/{manifest.parquet, part-*.tar, plan.json}`, honours the dedup
`keep` flags when `work/dedup/codes.parquet` exists, and swaps a complete new `shards/`
directory into place, so readers never see a half-written set. The index is wids-style
(`shardlist` with `nsamples`) plus our resolution and provenance fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.atomic import atomic_write_json, atomic_write_with
from preprocessing.errors import UserError
from preprocessing.extraction import part_stem, refresh_hint
from preprocessing.images import SAMPLE_EXT
from preprocessing.locks import LockSettings, rewriting_shards
from preprocessing.settings import ShardSettings
from preprocessing.state import DamagedStateError, read_json, read_parquet
from preprocessing.tar_shards import Member, TarShardWriter, index_tar, read_member

log = logging.getLogger(__name__)

# how to repair a damaged dedup result (formatted with the work directory)
DEDUP_REPAIR = (
    "redo dedup: dcgan-pipeline dedup --work {work} --refresh (a full re-dedup: kept items may change, "
    "and the next shard run then writes a new version)"
)

INDEX_KIND = "wids-shard-index-v1"
SAMPLES = "samples.parquet"  # every sample key with its shard and the version that added it
VERSIONS = "versions.json"  # one entry per version: time, samples added, totals per source, fingerprint


class ShardError(UserError):
    """A user-facing problem with the inputs or parameters of sharding."""


def extracted_sources(work: Path) -> list[Path]:
    """Extract directories that hold a complete (merged) manifest."""
    return sorted(p.parent for p in (Path(work) / "extract").glob("*/manifest.parquet"))


def _kept_keys(codes: Path | None, source: str, ok_keys: list[str]) -> list[str]:
    """The ok keys that dedup kept; dedup results that do not cover exactly these keys are stale."""
    if codes is None:
        return ok_keys
    table = read_parquet(codes, DEDUP_REPAIR.format(work=codes.parents[1]), columns=["key", "source", "keep"])
    table = table.filter(pc.equal(table["source"], source))
    if set(table["key"].to_pylist()) != set(ok_keys):
        raise ShardError(
            f"{codes} does not cover exactly the extracted items of {source} (extraction changed after dedup); "
            "rerun the dedup stage"
        )
    keep = set(table.filter(table["keep"])["key"].to_pylist())
    return [k for k in ok_keys if k in keep]


Item = tuple[str, str, Member, Member]  # (sample key, staging tar path, image member, json member)
Wanted = tuple[str, Path, str, int]  # (sample key, source dir, item key, part)


def _source_keys(src_dir: Path, codes: Path | None) -> tuple[int, list[Wanted]]:
    """(crop size, kept items) of one source, from its manifest and the dedup flags: no tar is read."""
    plan = read_json(src_dir / "plan.json", refresh_hint(src_dir))
    table = read_parquet(src_dir / "manifest.parquet", refresh_hint(src_dir), columns=["key", "status", "part"])
    ok = table.filter(pc.equal(table["status"], "ok"))
    part = dict(zip(ok["key"].to_pylist(), ok["part"].to_pylist(), strict=True))
    keys = _kept_keys(codes, src_dir.name, ok["key"].to_pylist())
    return int(plan["settings"]["size"]), [(f"{src_dir.name}/{k}", src_dir, k, part[k]) for k in keys]


def _locate(wanted: list[Wanted]) -> list[Item]:
    """The tar members of `wanted`, reading only the staging parts that hold them."""
    members: dict[tuple[Path, str], tuple[str, dict[str, Member]]] = {}
    for src_dir, p in sorted({(w[1], w[3]) for w in wanted}):
        tar = src_dir / f"{part_stem(p)}.tar"
        for m in index_tar(tar):
            members.setdefault((src_dir, m.key), (str(tar), {}))[1][m.ext] = m
    items = []
    for sample, src_dir, key, _ in wanted:
        tar, files = members.get((src_dir, key), ("", {}))
        if SAMPLE_EXT not in files or "json" not in files:
            raise ShardError(f"{src_dir}: kept item {key} is missing from the staging shards; re-extract")
        items.append((sample, tar, files[SAMPLE_EXT], files["json"]))
    return items


def build_shards(
    work: Path, settings: ShardSettings | None = None, *, rebuild: bool = False, lock: LockSettings | None = None
) -> dict:
    """Write `work/shards/train-%06d.tar` + `index.json` as a new version when the kept set grew; returns the index.

    With `settings.dedup` (the default) the items that dedup did not keep are left out when
    `work/dedup/codes.parquet` exists; without it the keep flags are ignored, never deleted.
    When every sample of the current version is still kept and the settings are the same, only
    the new samples are written, into new shard files (old files keep their names and bytes);
    otherwise, or with `rebuild`, the whole set is rewritten. Either way the version goes up by
    one and `versions.json` records it; no new samples means no new version. A rewrite waits
    for (or, with `lock.wait` off, refuses against) trainings reading the current shards.
    """
    settings = settings or ShardSettings()
    maxcount, maxsize, seed = settings.maxcount, settings.maxsize, settings.seed
    work = Path(work)
    codes: Path | None = work / "dedup" / "codes.parquet"
    if not settings.dedup or not codes.exists():
        codes = None
    sources = extracted_sources(work)
    if not sources:
        raise ShardError(f"no extracted data under {work / 'extract'}: run an extraction stage first")
    t0 = time.perf_counter()
    at_least = f":{settings.min_shards}" if settings.min_shards > 1 else ""  # old sets keep their fingerprint
    digest = hashlib.sha256(f"{maxcount}:{maxsize}:{seed}{at_least}".encode())
    wanted: list[Wanted] = []
    sizes: dict[str, int] = {}
    for src in sources:
        sizes[src.name], src_wanted = _source_keys(src, codes)
        wanted += src_wanted
        digest.update((src / "manifest.parquet").read_bytes())
    if codes is not None:
        digest.update(codes.read_bytes())
    if len(set(sizes.values())) != 1:
        raise ShardError(f"sources were extracted at different sizes {sizes}; re-extract them at one size")
    if not wanted:
        raise ShardError(f"no usable images in {', '.join(sizes)}: every item was rejected or removed")
    resolution = sizes[sources[0].name]
    final = work / "shards"
    current = _current_index(final, rebuild)
    if current is not None and not rebuild and current["fingerprint"] == digest.hexdigest():
        log.info("shards in %s are up to date (version %d)", final, current["version"])
        return {**current, "added": 0}
    previous = None if rebuild else _previous_samples(final, current, settings, resolution)
    written = set(previous["key"].to_pylist()) if previous is not None else None
    if written is not None and written <= {w[0] for w in wanted}:
        new = [w for w in wanted if w[0] not in written]
        if not new:
            log.info("shards in %s: no new samples, version %d stays", final, current["version"])
            return {**current, "added": 0}
        index = _append_version(final, current, previous, _locate(new), settings, digest.hexdigest())
    else:
        if current is None:
            reason = "first version"
        elif rebuild:
            reason = "rebuild asked for"
        else:
            reason = "rebuild: the kept set lost samples or the settings changed"
        items = _locate(wanted)
        with rewriting_shards(work, lock) if current is not None else contextlib.nullcontext():
            index = _write_version(
                work, final, current, items, settings, resolution, digest.hexdigest(), reason, rebuild
            )
    log.info(
        "shards version %d: %d samples (%d new) in %d shards at %s (%.1f s)",
        index["version"],
        index["total"],
        index["added"],
        len(index["shardlist"]),
        final,
        time.perf_counter() - t0,
    )
    return index


def _previous_samples(final: Path, current: dict | None, settings: ShardSettings, resolution: int) -> pa.Table | None:
    """samples.parquet of the current shards when new samples can be appended to them, else None."""
    same = {"seed": settings.seed, "maxcount": settings.maxcount, "maxsize": settings.maxsize, "resolution": resolution}
    same["min_shards"] = settings.min_shards
    if current is None or any(current.get(k, 1) != v for k, v in same.items()) or not (final / SAMPLES).exists():
        return None
    return read_parquet(final / SAMPLES, shard_repair(final))


def _write_shards(
    folder: Path, items: list[Item], start: int, settings: ShardSettings, seed: int, per_shard: int
) -> list[dict]:
    """Shuffle `items` with `seed` into `train-<start + i>.tar` files of <= `per_shard` samples; each appears whole."""
    order = np.random.default_rng(seed).permutation(len(items))
    shardlist: list[dict] = []
    handles: dict[str, BinaryIO] = {}
    writer: TarShardWriter | None = None
    written = 0
    try:
        for pos in order:
            key, tar, image, meta = items[pos]
            if writer is None or writer.count >= per_shard or written >= settings.maxsize:
                if writer is not None:
                    writer.close()
                    shardlist.append(_entry(writer))
                writer = TarShardWriter(folder / f"train-{start + len(shardlist):06d}.tar")
                written = 0
            if tar not in handles:
                handles[tar] = open(tar, "rb")  # noqa: SIM115 - closed in finally
            files = {SAMPLE_EXT: read_member(handles[tar], image), "json": read_member(handles[tar], meta)}
            writer.write(key, files)
            written += image.size + meta.size + 1024
        assert writer is not None
        writer.close()
        shardlist.append(_entry(writer))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for fh in handles.values():
            fh.close()
    for entry in shardlist:
        entry["filesize"] = (folder / entry["url"]).stat().st_size
    return shardlist


def _entry(writer: TarShardWriter) -> dict:
    """A shardlist entry (with its keys until samples.parquet takes them); the digests of its bytes and keys."""
    return {
        "url": writer.path.name,
        "nsamples": writer.count,
        "sha256": writer.sha256,
        "keys_sha256": writer.keys_sha256(),
        "keys": sorted(writer.keys),
    }


def _counts(keys: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        source = key.split("/", 1)[0]
        counts[source] = counts.get(source, 0) + 1
    return counts


def _finish(
    folder: Path, index: dict, shardlist: list[dict], previous: pa.Table | None, history: list[dict], start: int
) -> dict:
    """Write samples.parquet, versions.json and last index.json (the commit point) into `folder`."""
    version = index["version"]
    rows = [(k, i + start, version) for i, e in enumerate(shardlist) for k in e["keys"]]
    added = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "shard": pa.array([r[1] for r in rows], pa.int32()),
            "version": pa.array([r[2] for r in rows], pa.int32()),
        }
    )
    samples = added if previous is None else pa.concat_tables([previous, added])
    atomic_write_with(folder / SAMPLES, lambda tmp: pq.write_table(samples, tmp))
    history = [
        *history,
        {
            "version": version,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "added": len(rows),
            "added_per_source": _counts([r[0] for r in rows]),
            "total": index["total"],
            "per_source": index["sources"],
            "fingerprint": index["fingerprint"],
            "rebuild": previous is None and version > 1,
        },
    ]
    atomic_write_json(folder / VERSIONS, history)
    atomic_write_json(folder / "index.json", index)
    return {**index, "added": len(rows)}


def _versions(folder: Path, rebuilding: bool = False) -> list[dict]:
    """The version history; a damaged one is an error, except to a rebuild, which starts it anew (and says so)."""
    path = folder / VERSIONS
    if not path.exists():
        return []
    try:
        return read_json(path, shard_repair(folder))
    except DamagedStateError as exc:
        if not rebuilding:
            raise
        log.warning("%s; the rebuild starts the version history anew", exc)
        return []


def shard_repair(shards: Path) -> str:
    return f"rebuild the shards: dcgan-pipeline shard --work {Path(shards).parent} --refresh"


def samples_added_since(shards: Path, version: int) -> int:
    """Samples the versions after `version` added (a rebuild counts all of its samples as new)."""
    return sum(v["total"] if v["rebuild"] else v["added"] for v in _versions(Path(shards)) if v["version"] > version)


def _append_version(
    final: Path, current: dict, previous: pa.Table, new: list[Item], settings: ShardSettings, fingerprint: str
) -> dict:
    """New samples into new shard files beside the old ones; index.json, written last, commits them."""
    version = current["version"] + 1
    start = len(current["shardlist"])
    per_shard = current.get("samples_per_shard", settings.maxcount)  # as the full build chose: the count only grows
    shardlist = _write_shards(final, new, start, settings, seed=settings.seed + version, per_shard=per_shard)
    keys = [k for e in shardlist for k in e["keys"]]
    sources = dict(current["sources"])
    for source, n in _counts(keys).items():
        sources[source] = sources.get(source, 0) + n
    index = {
        **current,
        "shardlist": current["shardlist"] + [{k: v for k, v in e.items() if k != "keys"} for e in shardlist],
        "total": current["total"] + len(keys),
        "sources": sources,
        "fingerprint": fingerprint,
        "version": version,
    }
    return _finish(final, index, shardlist, previous, _versions(final), start)


def _write_version(
    work: Path,
    final: Path,
    current: dict | None,
    items: list[Item],
    settings: ShardSettings,
    resolution: int,
    fingerprint: str,
    reason: str,
    asked: bool,
) -> dict:
    """The whole set into a new directory swapped into place, so readers never see a mix.

    `asked`: the rebuild was asked for (--refresh), so a damaged version history starts anew.
    """
    version = current["version"] + 1 if current is not None else 1
    log.info("shards version %d: %s", version, reason)
    tmp = work / f".shards.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        per_shard = min(settings.maxcount, -(-len(items) // settings.min_shards))  # at least min_shards files
        shardlist = _write_shards(tmp, items, 0, settings, seed=settings.seed, per_shard=per_shard)
        index = {
            "__kind__": INDEX_KIND,
            "wids_version": 1,
            "name": "train",
            "shardlist": [{k: v for k, v in e.items() if k != "keys"} for e in shardlist],
            "total": len(items),
            "resolution": resolution,
            "sources": _counts([i[0] for i in items]),
            "seed": settings.seed,
            "maxcount": settings.maxcount,
            "maxsize": settings.maxsize,
            "min_shards": settings.min_shards,
            "samples_per_shard": per_shard,
            "fingerprint": fingerprint,
            "version": version,
        }
        index = _finish(tmp, index, shardlist, None, _versions(final, rebuilding=asked), 0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_dir(tmp, final)
    return index


def _current_index(final: Path, rebuild: bool) -> dict | None:
    """The existing index (None before the first version); damaged or incomplete, only a rebuild goes on.

    Nothing is silently started again at version 1: a rebuild over a damaged index takes the next
    number after the recorded history.
    """
    if not (final / "index.json").exists():
        return None
    try:
        index = read_index(final)
        missing = [s["url"] for s in index["shardlist"] if not (final / s["url"]).exists()]
        if missing:
            raise DamagedStateError(
                f"{final / missing[0]} ({len(missing)} of the shards index.json names) is missing -> "
                + shard_repair(final)
            )
    except (ShardError, DamagedStateError) as exc:
        if not rebuild:
            raise
        log.warning("%s; rebuilding", exc)
        history = _versions(final, rebuilding=True)
        return {"version": history[-1]["version"]} if history else None
    return {"version": 1, **index}  # sets written before versions were recorded are version 1


def _swap_dir(new: Path, final: Path) -> None:
    """Replace `final` by `new` with renames only: a crash leaves the old or the new set, never a mix."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_index(shards: Path) -> dict:
    """Load and sanity-check `shards/index.json`."""
    path = Path(shards) / "index.json"
    if not path.exists():
        raise ShardError(f"no shard index at {path}: run the shard stage first")
    index = read_json(path, shard_repair(path.parent))
    if not isinstance(index, dict) or index.get("__kind__") != INDEX_KIND or "shardlist" not in index:
        raise ShardError(f"{path} is not a dcgan-pipeline shard index -> {shard_repair(path.parent)}")
    if not index["shardlist"]:
        raise ShardError(f"{path} lists no shards: no item survived extraction and dedup")
    return index
