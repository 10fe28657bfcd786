"""One writer at a time on each part of a work directory, and no shard rewrite under a reader.

Every stage holds a lock on what it writes for its whole run, one file each under
`<work>/locks/` (outside the folders a refresh deletes or a rebuild swaps): an extraction
source (`extract-<source>.lock`), dedup, the shards, a training run (`train-<run>.lock`) and
the registry's retrain. A training also holds `shards-readers.lock` shared, which a shard
rebuild (rewriting files in place of the old ones) takes exclusively; a new version only adds
files, so it never waits for readers.

The exclusion is an `flock`, which the kernel drops when its holder dies, so a crashed stage
never blocks the next; the file names the holder (pid, host, command, start time) for the
waiter's log line and the `--no-wait` error. A name left by a dead holder is taken over and
logged. Children forked while a lock is held close their copy, so a pool worker that outlives
its parent cannot keep the lock. The file is emptied, never deleted, on release: deleting it
would let a waiter lock a stale inode while a newcomer locks a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from preprocessing.errors import UserError
from preprocessing.settings import Settings

log = logging.getLogger(__name__)

LOCKS = "locks"
READERS = "shards-readers"
_POLL_S = 0.2
_REMIND_S = 60.0
_HELD: set[int] = set()  # fds of locks this process holds; closed in forked children


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockSettings(Settings):
    """What a stage does when another writer holds what it writes."""

    wait: bool = Field(True, description="wait while another process writes the same files (off: fail, naming it)")
    wait_timeout: float | None = Field(
        None, gt=0, description="seconds to wait for another writer before failing (default: no limit)"
    )


class LockedError(UserError):
    """Another process writes what this stage would write (or reads what it would rewrite)."""


def lock_path(work: Path, name: str) -> Path:
    """`<work>/locks/<name>.lock`: `extract-<source>`, `dedup`, `shards`, `train-<run>`, `retrain`."""
    return Path(work) / LOCKS / (re.sub(r"[^A-Za-z0-9_.\-]", "_", name) + ".lock")


def command_line() -> str:
    """This process's command, as the lock names it."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


def read_holder(path: Path) -> dict:
    """The holder a lock file names ({} when empty, unreadable or garbage)."""
    try:
        holder = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it did not name itself)"
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
        f"({holder.get('command', '?')})"
    )


def _try(fd: int, shared: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(fd: int, path: Path, what: str, settings: LockSettings, shared: bool, busy: str) -> None:
    """Take the flock now, or wait as the settings say; a LockedError names who holds it."""
    if _try(fd, shared):
        return
    if not settings.wait:
        raise LockedError(f"{what} is busy: {busy} holds {path}; rerun when it is done (or without --no-wait)")
    start = last = time.monotonic()
    log.warning("%s is busy: waiting for %s (lock %s)", what, busy, path)
    while not _try(fd, shared):
        now = time.monotonic()
        if settings.wait_timeout is not None and now - start >= settings.wait_timeout:
            raise LockedError(
                f"{what} is still busy after {settings.wait_timeout:g} s: {busy} holds {path}; rerun when it is done"
            )
        if now - last >= _REMIND_S:
            log.info("%s: still waiting for %s (%.0f s)", what, busy, now - start)
            last = now
        time.sleep(_POLL_S)
    log.info("%s: the lock %s is free after %.1f s", what, path, time.monotonic() - start)


@contextmanager
def hold(path: Path, what: str, settings: LockSettings | None = None, command: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock `path` for the block, writing this process's name into it."""
    settings = settings or LockSettings()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, what, settings, False, busy=describe(read_holder(path)))
        _HELD.add(fd)
        left = read_holder(path)
        if left:
            log.warning("taking over the lock %s of %s: that process died holding it", path, describe(left))
        elif os.fstat(fd).st_size:
            log.warning("the lock %s held no holder's name (damaged); taking it", path)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or command_line()}
        holder["since"] = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the flock


@contextmanager
def reading_shards(work: Path) -> Iterator[None]:
    """Hold the shards' readers lock shared: a rebuild waits until the block ends."""
    path = lock_path(work, READERS)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # a reader waits only while a rebuild runs, which is short, and never with an error
        _acquire(fd, path, f"reading {Path(work) / 'shards'}", LockSettings(), True, busy="a shard rebuild")
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)


@contextmanager
def rewriting_shards(work: Path, settings: LockSettings | None = None) -> Iterator[None]:
    """Hold the readers lock exclusively while the shard files are replaced: no training reads them."""
    settings = settings or LockSettings()
    path = lock_path(work, READERS)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        readers = ", ".join(describe(h) for h in running_trainings(work)) or "a training"
        busy = f"{readers} reading the shards"
        _acquire(fd, path, f"a rebuild of {Path(work) / 'shards'}", settings, False, busy=busy)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether some process holds the lock `path` now (without waiting)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if _try(fd, shared=True):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def running_trainings(work: Path) -> list[dict]:
    """The holders of the training runs of `work` that hold their run's lock now."""
    return [read_holder(p) for p in sorted((Path(work) / LOCKS).glob("train-*.lock")) if is_held(p)]
