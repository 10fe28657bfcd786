"""Training checkpoints: everything needed to resume exactly, loadable with weights_only=True.

A checkpoint holds G, D, both optimizers, the step, the training config, the fixed sample
noise and the torch RNG states, as plain tensors and Python containers only. Files are
written to a temporary name and renamed, so a crash never leaves a truncated checkpoint.
The trainer keeps the bytes of the last good checkpoint in memory: a NaN rolls back to
exactly what is on disk. `best.pt` (with `best.json`) sits beside the numbered files and
is never pruned. `checkpoints/sha256.json` holds the sha256 of every checkpoint there, taken
from the bytes as they are written (no second read), for `dcgan-pipeline verify --data`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from preprocessing.atomic import atomic_write_bytes, atomic_write_json
from preprocessing.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "dcgan-pipeline-checkpoint/1"
_NAME = re.compile(r"^step-(\d{8})\.pt$")
BEST = "best.pt"
CHECKSUMS = "sha256.json"


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupted, or belongs to an incompatible model."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def eval_dir_for(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """`<work>/train/<run>` -> `<work>/eval/<run>` for the run's newest checkpoint.

    An earlier checkpoint (or `best.pt`) is evaluated into `<work>/eval/<run>@<checkpoint stem>`,
    so comparing training lengths never writes over the evaluation of the run itself.
    """
    base = run_dir.parent.parent / "eval" / run_dir.name
    if checkpoint is None:
        return base
    newest = list_checkpoints(run_dir)
    if newest and Path(checkpoint).resolve() == newest[-1].resolve():
        return base
    return base.with_name(f"{run_dir.name}@{Path(checkpoint).stem}")


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The checkpoint's bytes: equal states give equal bytes, whether or not they were loaded from a file."""
    buf = io.BytesIO()
    torch.save(_interned({"format": FORMAT, **state}), buf)
    return buf.getvalue()


def _interned(value: Any) -> Any:
    """`value` with every string interned. Pickle writes an object once per identity: a resumed run's
    optimizer keys are fresh strings from unpickling, so without this its checkpoints would hold the
    same tensors as an uninterrupted run's in other bytes (and another sha256)."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_interned(v) for v in value)
    return value


def write_checkpoint(data: bytes, run_dir: Path, step: int, keep: int) -> Path:
    """Write encoded checkpoint bytes atomically, then prune to the newest `keep` checkpoints."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    record_checksum(path, data)
    return path


def record_checksum(path: Path, data: bytes) -> None:
    """Record the sha256 of `data`, just written to `path`, in its folder's sha256.json (pruned files dropped)."""
    index = path.parent / CHECKSUMS
    try:
        sums = read_checksums(path.parent)
    except CheckpointError as exc:
        log.warning("%s: starting it anew", exc)
        sums = {}
    sums[path.name] = hashlib.sha256(data).hexdigest()
    atomic_write_json(index, {name: sha for name, sha in sums.items() if (path.parent / name).exists()})


def read_checksums(folder: Path) -> dict[str, str]:
    """checkpoint name -> sha256, as written with each checkpoint ({} before any was recorded)."""
    index = Path(folder) / CHECKSUMS
    if not index.exists():
        return {}
    try:
        sums = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{index} is damaged ({exc}); it is rewritten with the next checkpoint") from None
    return sums if isinstance(sums, dict) else {}


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    return write_checkpoint(encode_checkpoint(state), run_dir, step, keep)


def decode_checkpoint(data: bytes | Path, source: str) -> dict[str, Any]:
    """Load with weights_only=True (no code runs from the file) and check its format."""
    try:
        state = torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {source}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a dcgan-pipeline checkpoint")
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    return decode_checkpoint(Path(path), str(path))
