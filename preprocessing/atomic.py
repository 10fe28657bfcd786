"""Atomic file writes: readers see the old or the complete new content, never a partial file.

Shared by every package (preprocessing is the base layer that dcgan/, dedup/ and flows/ build on).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from preprocessing.errors import UserError


class NoSpaceError(UserError):
    """The disk (or quota) filled up while a file was written; nothing partial was left in its place."""


@contextmanager
def space_for(path: Path) -> Iterator[None]:
    """Turn a full disk while writing `path` into one clear error naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpaceError(
            f"no space left on the device while writing {path}: free some space and rerun (nothing partial was kept)"
        ) from None


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process, for writing before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_with(path: Path, write: Callable[[Path], object]) -> None:
    """Let `write(tmp)` produce the file (pyarrow, numpy, torch ...), then rename it into place."""
    tmp = temp_path(path)
    try:
        with space_for(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` durably (fsync) under a temporary name, then rename it to `path`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write_with(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
