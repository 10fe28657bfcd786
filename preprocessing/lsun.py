"""Read the official LSUN LMDB layout and turn it into square crops in staging shards.

Layout: a `<category>_<split>_lmdb` directory holding `data.mdb`; keys are 40-hex ASCII,
values are encoded images (WebP or JPEG in practice; we sniff, never trust). Work is cut
into key ranges (`Partition`) so it maps over processes or Prefect tasks, and each range
is written as one complete part or not at all, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import lmdb
import pyarrow as pa

from preprocessing.atomic import atomic_write_json
from preprocessing.errors import UserError
from preprocessing.images import (
    SAMPLE_EXT,
    ImageRejected,
    center_crop_resize,
    decode_rgb,
    encode_ppm,
)
from preprocessing.manifest import ManifestRow, existing_plan, merge_part_manifests, read_manifest, write_manifest
from preprocessing.parallel import process_pool
from preprocessing.settings import LsunSettings
from preprocessing.tar_shards import TarShardWriter

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9_\-]+$")


class LsunError(UserError):
    """A user-facing problem with an LSUN database path or its parameters."""


@dataclass(frozen=True)
class Partition:
    """A contiguous key range [start, end) of one LMDB; keys are stored as hex of the raw bytes."""

    source: str
    db: str
    index: int
    start: str
    end: str | None
    count: int

    @property
    def stem(self) -> str:
        return f"part-{self.index:06d}"


def resolve_db(path: str | Path) -> Path:
    """Return the LMDB directory for `path` (the directory or its data.mdb) or raise LsunError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LsunError(f"LSUN database not found: {p}")
    if p.is_file() and p.name == "data.mdb":
        p = p.parent
    if not p.is_dir() or not (p / "data.mdb").is_file():
        raise LsunError(f"{p} is not an LMDB directory (expected {p / 'data.mdb'})")
    return p.resolve()


def source_name(db: Path) -> str:
    """`bedroom_train_lmdb` -> `bedroom_train`; names become shard key prefixes, so keep them safe."""
    name = db.name[: -len("_lmdb")] if db.name.endswith("_lmdb") else db.name
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", name)
    return name or "lsun"


_ENVS: dict[str, lmdb.Environment] = {}


def open_env(db: Path) -> lmdb.Environment:
    """Open read-only without locks or readahead; cached per process (never shared across fork)."""
    key = str(db)
    env = _ENVS.get(key)
    if env is None:
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=126)
        except lmdb.Error as exc:
            raise LsunError(f"{db} is not a readable LMDB: {exc}") from exc
        _ENVS[key] = env
    return env


def forget_envs() -> None:
    """Drop cached handles: a forked worker must open its own LMDB environments."""
    _ENVS.clear()


def db_fingerprint(db: Path) -> str:
    """Cheap identity of a database's content: its entry count plus data.mdb's size and mtime."""
    st = (db / "data.mdb").stat()
    entries = open_env(db).stat()["entries"]
    return f"{entries}:{st.st_size}:{st.st_mtime_ns}"


def plan_partitions(db: Path, source: str, part_size: int) -> list[Partition]:
    """Cut the key space into ranges of `part_size` keys (one key-only cursor pass, ~1M keys/s)."""
    if part_size < 1:
        raise LsunError(f"part size must be >= 1, got {part_size}")
    starts: list[bytes] = []
    counts: list[int] = []
    with open_env(db).begin(buffers=False) as txn:
        for i, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
            if i % part_size == 0:
                starts.append(bytes(key))
                counts.append(0)
            counts[-1] += 1
    parts = []
    for i, (start, n) in enumerate(zip(starts, counts, strict=True)):
        end = starts[i + 1].hex() if i + 1 < len(starts) else None
        parts.append(Partition(source, str(db), i, start.hex(), end, n))
    return parts


def sample_key(raw: bytes) -> str:
    """The LSUN key as text when it is safe for tar names, else its hex with an `x` prefix."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return text if _SAFE.match(text) else "x" + raw.hex()


def extract_partition(part: Partition, out_dir: Path, settings: LsunSettings) -> dict:
    """Crop every record of `part` into `out_dir/<part>.tar`, accounting for each key in `<part>.parquet`.

    A part whose manifest exists is complete (it is renamed into place last) and is skipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / f"{part.stem}.parquet"
    if manifest_path.exists():
        rows = read_manifest(manifest_path)
        return _summary(part, rows, 0.0, skipped=True)
    t0 = time.perf_counter()
    min_side = settings.effective_min_side()
    rows: list[ManifestRow] = []
    end = bytes.fromhex(part.end) if part.end is not None else None
    with open_env(Path(part.db)).begin(buffers=True) as txn, TarShardWriter(out_dir / f"{part.stem}.tar") as tar:
        cursor = txn.cursor()
        ok = cursor.set_range(bytes.fromhex(part.start))
        while ok:
            raw_key = bytes(cursor.key())
            if end is not None and raw_key >= end:
                break
            key = sample_key(raw_key)
            value = bytes(cursor.value())
            row = ManifestRow(key=key, source=part.source, part=part.index, nbytes=len(value))
            try:
                rgb, fmt, (w, h) = decode_rgb(
                    value, min_side=min_side, target_short_side=settings.size, max_pixels=settings.max_pixels
                )
                row.format, row.width, row.height = fmt, w, h
                crop = center_crop_resize(rgb, settings.size)
                tar.write(key, {SAMPLE_EXT: encode_ppm(crop), "json": row.sample_json()})
            except ImageRejected as exc:
                row.status, row.reason, row.detail = "rejected", exc.reason, exc.detail[:200]
            rows.append(row)
            ok = cursor.next()
    if len(rows) != part.count:
        raise LsunError(
            f"{part.db}: part {part.index} holds {len(rows)} keys, planned {part.count}; "
            "the database changed since planning (rerun with refresh)"
        )
    write_manifest(rows, manifest_path)
    summary = _summary(part, rows, time.perf_counter() - t0, skipped=False)
    log.info(
        "%s part %d: %d ok, %d rejected, %.0f img/s",
        part.source,
        part.index,
        summary["ok"],
        len(rows) - summary["ok"],
        len(rows) / max(summary["seconds"], 1e-9),
    )
    return summary


def _summary(part: Partition, rows: list[ManifestRow], seconds: float, *, skipped: bool) -> dict:
    reasons = Counter(r.reason for r in rows if r.status != "ok")
    return {
        "part": part.index,
        "total": len(rows),
        "ok": sum(r.status == "ok" for r in rows),
        "rejected": dict(reasons),
        "seconds": seconds,
        "skipped": skipped,
    }


def write_lsun_lmdb(db_dir: Path, values: Iterable[bytes], keys: Iterable[str] | None = None) -> list[str]:
    """Write values in the official LSUN layout (40-hex sha1 keys); for tests, demo and benchmarks."""
    values = list(values)
    if keys is None:
        keys = [hashlib.sha1(i.to_bytes(8, "little") + v).hexdigest() for i, v in enumerate(values)]
    keys = list(keys)
    db_dir.mkdir(parents=True, exist_ok=True)
    map_size = max(1 << 20, 2 * sum(len(v) + 128 for v in values))
    env = lmdb.open(str(db_dir), map_size=map_size, subdir=True)
    with env.begin(write=True) as txn:
        for k, v in zip(keys, values, strict=True):
            txn.put(k.encode("ascii"), v)
    env.close()
    return keys


def prepare_extraction(
    db: str | Path, work: Path, settings: LsunSettings, *, name: str | None = None
) -> tuple[Path, list[Partition]]:
    """Validate inputs and plan (or reload the plan of) an extraction into `work/extract/<source>`.

    A plan that exists for other inputs or settings is never mixed with new parts: the
    caller gets a clear error and must refresh the stage on purpose.
    """
    db_path = resolve_db(db)
    source = name or source_name(db_path)
    if not _SAFE.match(source):
        raise LsunError(f"source name {source!r} may hold only letters, digits, '_' and '-'")
    out_dir = Path(work) / "extract" / source
    recorded = {
        "db": str(db_path),
        "fingerprint": db_fingerprint(db_path),
        "size": settings.size,
        "part_size": settings.part_size,
        "max_pixels": settings.max_pixels,
        "min_side": settings.effective_min_side(),
    }
    plan = existing_plan(out_dir, recorded, LsunError)
    if plan is not None:
        return out_dir, [Partition(**p) for p in plan["partitions"]]
    parts = plan_partitions(db_path, source, settings.part_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "plan.json", {"settings": recorded, "partitions": [asdict(p) for p in parts]})
    return out_dir, parts


def extract_lsun(
    db: str | Path,
    work: Path,
    settings: LsunSettings | None = None,
    *,
    name: str | None = None,
    workers: int | None = None,
) -> pa.Table:
    """Plan, extract every partition on a process pool, and merge the manifest (no Prefect)."""
    settings = settings or LsunSettings()
    out_dir, parts = prepare_extraction(db, work, settings, name=name)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(parts) <= 1:
        for p in parts:
            extract_partition(p, out_dir, settings)
    else:
        with process_pool(workers, initializer=forget_envs) as pool:
            job = partial(extract_partition, out_dir=out_dir, settings=settings)
            for done, _ in enumerate(pool.map(job, parts), 1):
                log.info("extracted %d/%d parts", done, len(parts))
    return merge_part_manifests(out_dir, len(parts))
