"""Stage manifests: one Parquet row per input item, kept ("ok") or rejected with a reason.

The manifest is the accounting contract between stages (README, "Work directory"): every
input item appears exactly once, so nothing can be dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.atomic import atomic_write_with

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("nbytes", pa.int64()),
        ("part", pa.int32()),
    ]
)


@dataclass
class ManifestRow:
    key: str
    source: str
    part: int
    nbytes: int = 0
    status: str = "ok"
    reason: str | None = None
    detail: str | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None

    def sample_json(self) -> bytes:
        """The per-sample metadata stored next to the image in shards."""
        meta = {
            "key": self.key,
            "source": self.source,
            "format": self.format,
            "width": self.width,
            "height": self.height,
        }
        return json.dumps(meta, sort_keys=True).encode()


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Write rows to Parquet through a temporary name (a manifest is the 'part complete' marker)."""
    names = [f.name for f in fields(ManifestRow)]
    cols = {n: [getattr(r, n) for r in rows] for n in names}
    table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in SCHEMA}, schema=SCHEMA)
    write_table(table, path)


def write_table(table: pa.Table, path: Path) -> None:
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def read_manifest(path: Path) -> list[ManifestRow]:
    table = pq.read_table(path, schema=SCHEMA)
    return [ManifestRow(**row) for row in table.to_pylist()]


def merge_part_manifests(out_dir: Path, n_parts: int) -> pa.Table:
    """Concatenate part manifests into `manifest.parquet`; fails loudly on a missing part or duplicate key."""
    paths = [out_dir / f"part-{i:06d}.parquet" for i in range(n_parts)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} parts incomplete, e.g. {missing[:3]}")
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths]) if paths else SCHEMA.empty_table()
    keys = table.column("key")
    if len(keys) != len(pc.unique(keys)):
        raise RuntimeError(f"{out_dir}: duplicate keys across parts")
    write_table(table, out_dir / "manifest.parquet")
    return table


def existing_plan(out_dir: Path, settings: dict[str, Any], error: type[ValueError]) -> dict | None:
    """The stage's plan.json if it was made with these settings, None if there is none.

    A plan made with other inputs or settings is never mixed with new parts: the caller gets a
    clear error and must refresh the stage on purpose.
    """
    plan_path = out_dir / "plan.json"
    if not plan_path.exists():
        return None
    plan = json.loads(plan_path.read_text())
    if plan["settings"] != settings:
        changed = sorted(k for k in settings if plan["settings"].get(k) != settings[k])
        raise error(
            f"{out_dir} holds an extraction with other {', '.join(changed)}; "
            "refresh this stage to redo it (CLI: --refresh)"
        )
    return plan
