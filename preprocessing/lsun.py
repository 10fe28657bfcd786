"""Read the official LSUN LMDB layout and turn it into square crops in staging shards.

Layout: a `<category>_<split>_lmdb` directory holding `data.mdb`; keys are 40-hex ASCII,
values are encoded images (WebP or JPEG in practice; we sniff, never trust). An LMDB is one
kind of source of the extraction engine (`preprocessing.extraction`): its inputs are the keys
in cursor (byte) order, a part is a list of keys (the first run cuts them into consecutive
ranges of `part_size`, as before; keys added later go to new parts), and each part is written
as one complete part or not at all, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import lmdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.errors import UserError
from preprocessing.extraction import (
    ExtractionPlan,
    merge_manifests,
    plan_extraction,
    refresh_hint,
    run_part,
    run_parts,
)
from preprocessing.images import (
    SAMPLE_EXT,
    ImageRejected,
    center_crop_resize,
    decode_rgb,
    encode_ppm,
)
from preprocessing.manifest import SCHEMA, ManifestRow
from preprocessing.parallel import process_pool
from preprocessing.settings import LsunSettings
from preprocessing.state import read_json

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9_\-]+$")
# inputs.parquet columns of an LMDB: the sample key (the manifest's key) and the raw LMDB key.
LSUN_INDEX = pa.schema([("key", pa.string()), ("raw", pa.binary())])


class LsunError(UserError):
    """A user-facing problem with an LSUN database path or its parameters."""


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


def close_env(db: Path) -> None:
    """Close this process's cached handle of `db`, before writing to it (LMDB allows one open per process)."""
    for key in (str(db), str(Path(db).resolve())):
        env = _ENVS.pop(key, None)
        if env is not None:
            env.close()


def forget_envs() -> None:
    """Drop cached handles: a forked worker must open its own LMDB environments."""
    _ENVS.clear()


def db_fingerprint(db: Path) -> str:
    """Cheap identity of a database's content: its entry count plus data.mdb's size and mtime."""
    st = (db / "data.mdb").stat()
    entries = open_env(db).stat()["entries"]
    return f"{entries}:{st.st_size}:{st.st_mtime_ns}"


def sample_key(raw: bytes) -> str:
    """The LSUN key as text when it is safe for tar names, else its hex with an `x` prefix."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return text if _SAFE.match(text) else "x" + raw.hex()


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


@dataclass(frozen=True)
class LsunKind:
    """An LMDB as a source kind: inputs are its keys, fingerprinted by value length (no value is read)."""

    db: str
    source: str
    settings: LsunSettings

    name: ClassVar[str] = "lsun"
    identity: ClassVar[str] = "key"
    display: ClassVar[str] = "key"
    index_schema: ClassVar[pa.Schema] = LSUN_INDEX
    manifest_schema: ClassVar[pa.Schema] = SCHEMA
    error: ClassVar[type[UserError]] = LsunError

    def source_fingerprint(self) -> str:
        return db_fingerprint(Path(self.db))

    def list_inputs(self) -> pa.Table:
        """One cursor pass (~1M keys/s): a value's length is in its leaf node, so its pages stay unread."""
        keys, raws, lengths = [], [], []
        with open_env(Path(self.db)).begin(buffers=True) as txn:
            for key, value in txn.cursor().iternext(keys=True, values=True):
                raw = bytes(key)
                raws.append(raw)
                keys.append(sample_key(raw))
                lengths.append(str(len(value)))
        return pa.table({"key": keys, "raw": pa.array(raws, pa.binary()), "fingerprint": lengths})

    def legacy_index(self, out_dir: Path, plan: dict, listing: pa.Table) -> tuple[pa.Table, int]:
        """Format 1 cut key ranges: a finished part holds the keys of its manifest, others the keys listed now."""
        tables = []
        for p in plan["partitions"]:
            manifest = out_dir / f"part-{p['index']:06d}.parquet"
            if manifest.exists():
                keys = pq.read_table(manifest, columns=["key"])["key"]
                n = len(keys)
                t = pa.table({"key": keys, "raw": pa.nulls(n, pa.binary()), "fingerprint": pa.nulls(n, pa.string())})
            else:
                inside = pc.greater_equal(listing["raw"], pa.scalar(bytes.fromhex(p["start"]), pa.binary()))
                if p["end"] is not None:
                    below = pc.less(listing["raw"], pa.scalar(bytes.fromhex(p["end"]), pa.binary()))
                    inside = pc.and_(inside, below)
                t = listing.filter(inside)
            n = t.num_rows
            tables.append(t.append_column("part", pa.repeat(pa.scalar(p["index"], pa.int32()), n)))
        index = (
            pa.concat_tables(tables)
            if tables
            else listing.schema.empty_table().append_column("part", pa.array([], pa.int32()))
        )
        return index.append_column("gone", pa.repeat(pa.scalar(False), index.num_rows)), len(plan["partitions"])

    def process(self, part: int, refs: list[dict]) -> Iterator[tuple[dict, dict[str, bytes] | None]]:
        settings = self.settings
        min_side = settings.effective_min_side()
        with open_env(Path(self.db)).begin(buffers=True) as txn:
            for ref in refs:
                value = txn.get(ref["raw"])
                if value is None:
                    raise LsunError(
                        f"{self.db}: key {ref['key']} of part {part} is gone; the database changed since "
                        "planning: rerun to replan"
                    )
                value = bytes(value)
                row = ManifestRow(key=ref["key"], source=self.source, part=part, nbytes=len(value))
                files = None
                try:
                    rgb, fmt, (w, h) = decode_rgb(
                        value, min_side=min_side, target_short_side=settings.size, max_pixels=settings.max_pixels
                    )
                    row.format, row.width, row.height = fmt, w, h
                    crop = center_crop_resize(rgb, settings.size)
                    files = {SAMPLE_EXT: encode_ppm(crop), "json": row.sample_json()}
                except ImageRejected as exc:
                    row.status, row.reason, row.detail = "rejected", exc.reason, exc.detail[:200]
                yield asdict(row), files


def plan_settings(db: Path, settings: LsunSettings) -> dict:
    """What plan.json records of an LSUN extraction (a change in any is refused without refresh)."""
    return {
        "db": str(db),
        "size": settings.size,
        "part_size": settings.part_size,
        "max_pixels": settings.max_pixels,
        "min_side": settings.effective_min_side(),
    }


def prepare_extraction(
    db: str | Path, work: Path, settings: LsunSettings, *, name: str | None = None
) -> tuple[Path, ExtractionPlan]:
    """Validate inputs and plan (or extend the plan of) an extraction into `work/extract/<source>`.

    Keys added to the database since the last run go to new parts; finished parts are kept as
    they are. Other settings, or changed values under old keys, are refused with a clear error.
    """
    db_path = resolve_db(db)
    source = name or source_name(db_path)
    if not _SAFE.match(source):
        raise LsunError(f"source name {source!r} may hold only letters, digits, '_' and '-'")
    out_dir = Path(work) / "extract" / source
    kind = LsunKind(str(db_path), source, settings)
    return out_dir, plan_extraction(out_dir, kind, plan_settings(db_path, settings), settings.part_size)


def extract_partition(out_dir: Path, part: int, settings: LsunSettings) -> dict:
    """Crop every record of one part into `out_dir/<part>.tar`, each key accounted for in `<part>.parquet`."""
    plan = read_json(out_dir / "plan.json", refresh_hint(out_dir))
    return run_part(out_dir, part, LsunKind(plan["settings"]["db"], out_dir.name, settings))


def extract_lsun(
    db: str | Path,
    work: Path,
    settings: LsunSettings | None = None,
    *,
    name: str | None = None,
    workers: int | None = None,
) -> pa.Table:
    """Plan, extract the parts still to do on a process pool, and merge the manifest (no Prefect)."""
    settings = settings or LsunSettings()
    out_dir, plan = prepare_extraction(db, work, settings, name=name)
    job = partial(extract_partition, out_dir, settings=settings)
    pool = partial(process_pool, initializer=forget_envs)
    run_parts(job, plan.todo, workers or os.cpu_count() or 1, pool, out_dir.name)
    return merge_manifests(out_dir, LsunKind(str(resolve_db(db)), out_dir.name, settings))
