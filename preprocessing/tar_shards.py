"""Write and index WebDataset tar shards, atomically and byte-for-byte reproducibly.

Samples are groups of tar members sharing a key (`<key>.png`, `<key>.json`), the layout
stock `webdataset.WebDataset` reads. Headers carry no time or owner, so the same samples
in the same order give the same bytes: reruns after a crash can be checked by hash.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class TarShardWriter:
    """Append samples to `path` through a temporary file renamed into place on `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0
        self.keys: set[str] = set()

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if not SAFE_KEY.match(key):
            raise ValueError(f"unsafe sample key {key!r}")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path.name}")
        self.keys.add(key)
        for ext, payload in sorted(files.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            info.mode = 0o644
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class Member:
    """Where one sample file lies inside a tar, for random access without unpacking."""

    key: str
    ext: str
    offset: int
    size: int


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.png` -> (`dir/abc`, `png`): the key ends at the first dot of the base name."""
    prefix, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{prefix}/{stem}" if prefix else stem), ext


def index_tar(path: Path) -> Iterator[Member]:
    """List a tar's members with data offsets (reads headers only)."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            yield Member(key=key, ext=ext, offset=info.offset_data, size=info.size)


def read_member(fh: BinaryIO, member: Member) -> bytes:
    fh.seek(member.offset)
    data = fh.read(member.size)
    if len(data) != member.size:
        raise OSError(f"short read of {member.key}.{member.ext}")
    return data


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar written by `TarShardWriter`, in order."""
    current: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            if key != current and current is not None:
                yield current, files
                files = {}
            current = key
            fh = tar.extractfile(info)
            assert fh is not None
            files[ext] = fh.read()
    if current is not None:
        yield current, files
