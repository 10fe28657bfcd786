"""A Prefect cache policy keyed on file content fingerprints, not on path strings.

Prefect's INPUTS policy hashes a path string, so a changed file under the same name would
hit a stale cache. `FileFingerprint` replaces the named path inputs by the size and mtime
of every file below them, adds the source of the task and of the domain packages it calls
(TASK_SOURCE alone misses a change in `preprocessing/`), and includes the task's outputs:
when an output is missing the key is None, so a deleted result is always recomputed, and a
changed output changes the key. The price: the first rerun after a write misses the cache,
so the domain steps themselves skip work whose recorded inputs are unchanged (stamps).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy

from flows.runtime import retry_unless_user_error
from preprocessing.extraction import part_stem
from preprocessing.stamps import stamp


def fingerprint(path: str | Path) -> str:
    """Size and mtime of a file, or of every file below a directory (names sorted)."""
    return stamp([path]) if Path(path).exists() else "missing"


@cache
def package_source_hash(package: str) -> str:
    """Hash of a package's Python sources, so editing domain code invalidates cached results."""
    root = Path(import_module(package).__file__).parent  # type: ignore[arg-type]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class FileFingerprint(CachePolicy):
    """Cache key from task source, package sources, plain inputs and fingerprints of path inputs."""

    paths: tuple[str, ...] = ()
    outputs: Callable[[dict[str, Any]], list[Path]] | None = None
    packages: tuple[str, ...] = ("preprocessing",)
    derived: Callable[[dict[str, Any]], list[Path]] | None = field(default=None)

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        outs = self.outputs(inputs) if self.outputs else []
        if any(not Path(o).exists() for o in outs):
            return None
        source = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters, **kwargs) or ""
        parts: dict[str, Any] = {"source": source, "packages": [package_source_hash(p) for p in self.packages]}
        for name, value in sorted(inputs.items()):
            parts[name] = fingerprint(value) if name in self.paths else value
        extra = self.derived(inputs) if self.derived else []
        parts["derived"] = [fingerprint(p) for p in extra]
        parts["outputs"] = [fingerprint(o) for o in outs]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _part_outputs(inputs: dict[str, Any]) -> list[Path]:
    stem = part_stem(inputs["part"])
    return [Path(inputs["out_dir"]) / f"{stem}.parquet", Path(inputs["out_dir"]) / f"{stem}.tar"]


def _part_inputs(inputs: dict[str, Any]) -> list[Path]:
    return [Path(inputs["out_dir"]) / "plan.json", Path(inputs["out_dir"]) / "inputs.parquet"]


# Task options of one extraction part (any source kind): cached on the plan and the part's own files.
PART_TASK: dict[str, Any] = {
    "cache_policy": FileFingerprint(outputs=_part_outputs, derived=_part_inputs),
    "persist_result": True,
    "retries": 1,
    "retry_condition_fn": retry_unless_user_error,
}
