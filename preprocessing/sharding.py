"""Final WebDataset shards: every kept item of every extracted source, shuffled with a seed.

Reads `work/extract/<source>/{manifest.parquet, part-*.tar, plan.json}`, honours the dedup
`keep` flags when `work/dedup/codes.parquet` exists, and swaps a complete new `shards/`
directory into place, so readers never see a half-written set. The index is wids-style
(`shardlist` with `nsamples`) plus our resolution and provenance fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.atomic import atomic_write_json
from preprocessing.errors import UserError
from preprocessing.images import SAMPLE_EXT
from preprocessing.settings import ShardSettings
from preprocessing.tar_shards import Member, TarShardWriter, index_tar, read_member

log = logging.getLogger(__name__)

INDEX_KIND = "wids-shard-index-v1"


class ShardError(UserError):
    """A user-facing problem with the inputs or parameters of sharding."""


def extracted_sources(work: Path) -> list[Path]:
    """Extract directories that hold a complete (merged) manifest."""
    return sorted(p.parent for p in (Path(work) / "extract").glob("*/manifest.parquet"))


def _kept_keys(codes: Path | None, source: str, ok_keys: list[str]) -> list[str]:
    """The ok keys that dedup kept; dedup results that do not cover exactly these keys are stale."""
    if codes is None:
        return ok_keys
    table = pq.read_table(codes, columns=["key", "source", "keep"])
    table = table.filter(pc.equal(table["source"], source))
    if set(table["key"].to_pylist()) != set(ok_keys):
        raise ShardError(
            f"{codes} does not cover exactly the extracted items of {source} (extraction changed after dedup); "
            "rerun the dedup stage"
        )
    keep = set(table.filter(table["keep"])["key"].to_pylist())
    return [k for k in ok_keys if k in keep]


Item = tuple[str, str, Member, Member]  # (key, staging tar path, image member, json member)


def _source_items(src_dir: Path, codes: Path | None) -> tuple[int, list[Item]]:
    """(resolution, items) for the kept items of one source."""
    plan = json.loads((src_dir / "plan.json").read_text())
    table = pq.read_table(src_dir / "manifest.parquet", columns=["key", "status", "part"])
    ok = table.filter(pc.equal(table["status"], "ok"))
    keys = _kept_keys(codes, src_dir.name, ok["key"].to_pylist())
    members: dict[str, tuple[str, dict[str, Member]]] = {}
    for tar in sorted(src_dir.glob("part-*.tar")):
        for m in index_tar(tar):
            members.setdefault(m.key, (str(tar), {}))[1][m.ext] = m
    items = []
    for key in keys:
        tar, files = members.get(key, ("", {}))
        if SAMPLE_EXT not in files or "json" not in files:
            raise ShardError(f"{src_dir}: kept item {key} is missing from the staging shards; re-extract")
        items.append((key, tar, files[SAMPLE_EXT], files["json"]))
    return int(plan["settings"]["size"]), items


def build_shards(work: Path, settings: ShardSettings | None = None) -> dict:
    """Write `work/shards/train-%06d.tar` + `index.json`; returns the index.

    With `settings.dedup` (the default) the items that dedup did not keep are left out when
    `work/dedup/codes.parquet` exists; without it the keep flags are ignored, never deleted.
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
    digest = hashlib.sha256(f"{maxcount}:{maxsize}:{seed}".encode())
    items: list[Item] = []
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for src in sources:
        size, src_items = _source_items(src, codes)
        sizes[src.name] = size
        counts[src.name] = len(src_items)
        items += [(f"{src.name}/{key}", tar, image, meta) for key, tar, image, meta in src_items]
        digest.update((src / "manifest.parquet").read_bytes())
    if codes is not None:
        digest.update(codes.read_bytes())
    if len(set(sizes.values())) != 1:
        raise ShardError(f"sources were extracted at different sizes {sizes}; re-extract them at one size")
    if not items:
        raise ShardError(f"no usable images in {', '.join(sizes)}: every item was rejected or removed")
    resolution = sizes[sources[0].name]
    final = work / "shards"
    current = _current_index(final)
    if current is not None and current["fingerprint"] == digest.hexdigest():
        log.info("shards in %s are up to date", final)
        return current
    order = np.random.default_rng(seed).permutation(len(items))

    tmp = work / f".shards.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shardlist: list[dict] = []
    handles: dict[str, BinaryIO] = {}
    writer: TarShardWriter | None = None
    written = 0
    try:
        for pos in order:
            key, tar, image, meta = items[pos]
            if writer is None or writer.count >= maxcount or written >= maxsize:
                if writer is not None:
                    writer.close()
                    shardlist.append({"url": writer.path.name, "nsamples": writer.count})
                writer = TarShardWriter(tmp / f"train-{len(shardlist):06d}.tar")
                written = 0
            if tar not in handles:
                handles[tar] = open(tar, "rb")  # noqa: SIM115 - closed in finally
            files = {SAMPLE_EXT: read_member(handles[tar], image), "json": read_member(handles[tar], meta)}
            writer.write(key, files)
            written += image.size + meta.size + 1024
        assert writer is not None
        writer.close()
        shardlist.append({"url": writer.path.name, "nsamples": writer.count})
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for fh in handles.values():
            fh.close()
    for entry in shardlist:
        entry["filesize"] = (tmp / entry["url"]).stat().st_size
    index = {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": "train",
        "shardlist": shardlist,
        "total": len(items),
        "resolution": resolution,
        "sources": counts,
        "seed": seed,
        "fingerprint": digest.hexdigest(),
    }
    atomic_write_json(tmp / "index.json", index)
    _swap_dir(tmp, final)
    log.info(
        "wrote %d samples in %d shards to %s (%.1f s)", len(items), len(shardlist), final, time.perf_counter() - t0
    )
    return index


def _current_index(final: Path) -> dict | None:
    """The existing index when it and all its shards are present, else None."""
    try:
        index = read_index(final)
    except (ShardError, ValueError):
        return None
    return index if all((final / s["url"]).exists() for s in index["shardlist"]) else None


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
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not a dcgan-pipeline shard index: {exc}") from exc
    if not isinstance(index, dict) or index.get("__kind__") != INDEX_KIND or "shardlist" not in index:
        raise ShardError(f"{path} is not a dcgan-pipeline shard index")
    if not index["shardlist"]:
        raise ShardError(f"{path} lists no shards: no item survived extraction and dedup")
    return index
