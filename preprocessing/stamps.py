"""Cheap content stamps of files, so a step can tell whether its recorded inputs changed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def stamp(paths: Iterable[str | Path]) -> str:
    """Hash of (name, size, mtime) of each file, or of every file below each directory."""
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if not p.exists():
            h.update(f"{p}:missing\n".encode())
            continue
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
