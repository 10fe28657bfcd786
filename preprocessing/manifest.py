"""Stage manifests: one Parquet row per input item, kept ("ok") or rejected with a reason.

The manifest is the accounting contract between stages (README, "Work directory"): every
input item appears exactly once, so nothing can be dropped silently. Parts are planned, run
and merged by `preprocessing.extraction`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
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


def write_table(table: pa.Table, path: Path) -> None:
    """Write a table through a temporary name: a part's manifest is its 'complete' marker."""
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))
