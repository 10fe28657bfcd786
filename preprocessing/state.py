"""Reading the work directory's state files: a damaged or missing one is a UserError that says how to repair it.

Every stage reads its inputs' indexes (Parquet, JSON, .npy) through these helpers, so a
truncated file ends in one `error:` line naming the file and the command that repairs it,
never in a pyarrow or JSON traceback; and nothing is rebuilt silently in a way that loses data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.errors import UserError


class DamagedStateError(UserError):
    """A state file of the work directory is missing or cannot be read."""


def _fail(path: Path, exc: BaseException, repair: str) -> DamagedStateError:
    if isinstance(exc, FileNotFoundError):
        return DamagedStateError(f"{path} is missing -> {repair}")
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return DamagedStateError(f"{path} is damaged ({reason}) -> {repair}")


_ERRORS = (OSError, ValueError, EOFError, pa.ArrowException)


def read_parquet(path: Path, repair: str, **kwargs: Any) -> pa.Table:
    """`pq.read_table(path, **kwargs)`, or a DamagedStateError naming `path` and `repair`."""
    try:
        return pq.read_table(path, **kwargs)
    except _ERRORS as exc:
        raise _fail(Path(path), exc, repair) from None


def read_parquet_metadata(path: Path, repair: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except _ERRORS as exc:
        raise _fail(Path(path), exc, repair) from None


def read_json(path: Path, repair: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (*_ERRORS, UnicodeDecodeError) as exc:
        raise _fail(Path(path), exc, repair) from None


def load_npy(path: Path, repair: str) -> np.ndarray:
    """A memory-mapped .npy whose size matches its header (a truncated file is refused here, not mid-read)."""
    try:
        return np.load(path, mmap_mode="r")
    except _ERRORS as exc:
        raise _fail(Path(path), exc, repair) from None
