"""Photo collections as inputs: a folder tree, a tar of photos, or a Parquet table of bytes.

`list_photos` indexes a collection into a table (key, path, label, locator, fingerprint) that
the extraction engine keeps as `inputs.parquet` with the part of each photo, and `read_photos`
fetches the bytes of one part. Keys are stable: a hash of the relative path (folders, tars) or
the table's own key, so reruns, resumes and a grown collection line up. Fingerprints tell a
changed photo under an old key: size and mtime (folder files, tar members), or a hash of the
row's bytes (tables).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.errors import UserError

SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
INPUT_SCHEMA = pa.schema(
    [
        ("photo_key", pa.string()),
        ("photo_path", pa.string()),
        ("label", pa.string()),
        ("offset", pa.int64()),  # tar: data offset; table: row index; folder: -1
        ("size", pa.int64()),  # tar: member size; else -1
    ]
)
LISTING_SCHEMA = pa.schema(list(INPUT_SCHEMA) + [("fingerprint", pa.string())])
# Files with these endings in a folder are never photos; anything else is sniffed.
_SKIP_SUFFIXES = {".txt", ".json", ".xml", ".csv", ".md", ".parquet", ".py", ".pdf", ".zip"}


class PhotoSourceError(UserError):
    """A photo collection that cannot be read as given (clear message for the user)."""


@dataclass(frozen=True)
class PhotoSource:
    path: str
    kind: str  # "folder" | "tar" | "table"


def _path_key(relpath: str) -> str:
    return hashlib.sha1(relpath.encode()).hexdigest()[:20]


def table_key(key: object, row: int) -> str:
    """The table's key when it is safe for shard names, else a stable hash of it."""
    text = str(key) if key is not None else f"row{row}"
    return text if SAFE_KEY.match(text) else hashlib.sha1(text.encode()).hexdigest()[:20]


def open_source(path: str | Path) -> PhotoSource:
    p = Path(path).expanduser()
    if not p.exists():
        raise PhotoSourceError(f"photo collection not found: {p}")
    if p.is_dir():
        return PhotoSource(str(p.resolve()), "folder")
    if p.suffix == ".parquet":
        return PhotoSource(str(p.resolve()), "table")
    if tarfile.is_tarfile(p):
        return PhotoSource(str(p.resolve()), "tar")
    raise PhotoSourceError(f"{p} is neither a folder, a tar of photos, nor a .parquet table")


def source_fingerprint(src: PhotoSource) -> str | None:
    """Size and mtime of a tar or table file; None for a folder (only a listing tells what changed)."""
    if src.kind == "folder":
        return None
    st = Path(src.path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def list_photos(src: PhotoSource, *, labels_from_folders: bool = False) -> pa.Table:
    """Index every photo of the collection (sorted, so the index is deterministic), with its fingerprint."""
    rows: list[tuple] = []
    if src.kind == "folder":
        files = sorted(_walk(src.path), key=lambda f: f[0].split("/"))  # the order of sorted(Path.rglob(...))
        for rel, st in files:
            label = rel.split("/")[0] if labels_from_folders and "/" in rel else None
            rows.append((_path_key(rel), rel, label, -1, -1, f"{st.st_size}:{st.st_mtime_ns}"))
    elif src.kind == "tar":
        with tarfile.open(src.path, mode="r:") as tar:
            for info in tar:
                if info.isfile() and Path(info.name).suffix.lower() not in _SKIP_SUFFIXES:
                    label = info.name.split("/")[0] if labels_from_folders and "/" in info.name else None
                    fingerprint = f"{info.size}:{info.mtime}"
                    rows.append((_path_key(info.name), info.name, label, info.offset_data, info.size, fingerprint))
        rows.sort(key=lambda r: r[1])
    else:
        schema = pq.read_schema(src.path)
        missing = {"key", "image"} - set(schema.names)
        if missing:
            raise PhotoSourceError(
                f"{src.path} lacks column(s) {sorted(missing)}; an image table needs 'key' and 'image' "
                f"(encoded bytes), it has {schema.names}"
            )
        cols = ["key"] + (["label"] if "label" in schema.names else [])
        table = pq.read_table(src.path, columns=cols)
        keys = table.column("key").to_pylist()
        labels = table.column("label").to_pylist() if "label" in cols else [None] * len(keys)
        hashes = _row_hashes(src.path)
        for i, (k, lab, fp) in enumerate(zip(keys, labels, hashes, strict=True)):
            rows.append((table_key(k, i), str(k), None if lab is None else str(lab), i, -1, fp))
    if not rows:
        raise PhotoSourceError(f"{src.path} holds no files to read as photos")
    names = LISTING_SCHEMA.names
    table = pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows], schema=LISTING_SCHEMA)
    if len(pc.unique(table["photo_key"])) != table.num_rows:
        raise PhotoSourceError(f"{src.path}: photo keys are not unique (duplicate table keys?)")
    return table


def _walk(root: str, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of every file below `root` that may be a photo; one stat per file.

    As `Path.rglob("*")` does: symlinked files are followed, symlinked folders are not entered.
    """
    with os.scandir(root) as entries:
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir() and not entry.is_symlink():
                yield from _walk(entry.path, rel + "/")
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() not in _SKIP_SUFFIXES:
                yield rel, entry.stat()


def _row_hashes(path: str) -> list[str]:
    """A content hash of each row's image bytes, one row group at a time."""
    hashes = []
    for batch in pq.ParquetFile(path).iter_batches(columns=["image"], batch_size=1024):
        for value in batch.column(0).to_pylist():
            data = value.encode("latin-1") if isinstance(value, str) else value or b""
            hashes.append(hashlib.blake2b(data, digest_size=10).hexdigest())
    return hashes


def read_photos(src: PhotoSource, refs: list[dict]) -> Iterator[tuple[dict, bytes | None, str | None]]:
    """Yield (ref, bytes, error) for each ref; a read failure is reported, never raised."""
    if src.kind == "folder":
        for ref in refs:
            try:
                yield ref, (Path(src.path) / ref["photo_path"]).read_bytes(), None
            except OSError as exc:
                yield ref, None, f"{type(exc).__name__}: {exc}"
    elif src.kind == "tar":
        with open(src.path, "rb") as fh:
            for ref in refs:
                fh.seek(ref["offset"])
                data = fh.read(ref["size"])
                yield ref, data, None if len(data) == ref["size"] else "short read"
    else:
        yield from _read_table_rows(src.path, refs)


def _read_table_rows(path: str, refs: list[dict]) -> Iterator[tuple[dict, bytes | None, str | None]]:
    """Read only the row groups that hold the wanted rows."""
    pf = pq.ParquetFile(path)
    wanted = sorted(ref["offset"] for ref in refs)
    lo, hi = wanted[0], wanted[-1]
    start, images = 0, {}
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start + n > lo and start <= hi:
            column = pf.read_row_group(g, columns=["image"]).column("image")
            for i in range(max(lo, start), min(hi + 1, start + n)):
                images[i] = column[i - start].as_py()
        start += n
    for ref in refs:
        data = images.get(ref["offset"])
        if isinstance(data, str):
            data = data.encode("latin-1")
        yield ref, data, None if data is not None else "null image"
