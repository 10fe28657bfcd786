"""Is the training part of a work directory whole: checkpoints match their recorded sha256, registry runs load."""

from __future__ import annotations

from pathlib import Path

from dcgan.checkpoint import BEST, CheckpointError, list_checkpoints, load_checkpoint, read_checksums
from dcgan.registry import RegistryError, load_registry, registry_path
from preprocessing.integrity import Findings, Read


def _resume(work: Path, run: str) -> str:
    return (
        f"delete it (the run's earlier checkpoints remain) and resume: dcgan-pipeline train --work {work} "
        f"--run {run} --resume"
    )


def check_training(work: Path, data: bool) -> Findings:
    """Every run's checkpoints/sha256.json names files that exist (with `data`: whose bytes match)."""
    found = Findings()
    for folder in sorted(Path(work).glob("train/*/checkpoints")):
        run = folder.parent.name
        stage = f"train/{run}"
        try:
            sums = read_checksums(folder)
        except CheckpointError as exc:
            found.add(stage, folder / "sha256.json", str(exc).split(";")[0], "it is rewritten with the next checkpoint")
            sums = {}
        files = [*list_checkpoints(folder.parent), *([folder / BEST] if (folder / BEST).exists() else [])]
        for name in sorted(set(sums) - {f.name for f in files}):
            found.add(stage, folder / name, f"{name} (named by sha256.json) is missing", _resume(work, run))
        for path in files:
            found.checked["checkpoints"] += 1
            if not data:
                continue
            if path.name in sums:
                found.to_read.append(Read(stage, path, sums[path.name], _resume(work, run)))
            else:
                found.checked["checkpoints without a checksum"] += 1
    return found


def check_registry(work: Path) -> Findings:
    """registry.json reads, and each registered run's newest checkpoint loads."""
    found = Findings()
    path = registry_path(Path(work))
    if not path.exists():
        return found
    try:
        registry = load_registry(Path(work))
    except RegistryError as exc:
        found.add("registry", path, str(exc)[:200], "restore it from a backup: it holds the promotion history")
        return found
    for name, entry in sorted(registry.runs.items()):
        found.checked["registered runs"] += 1
        checkpoints = list_checkpoints(Path(entry.run_dir))
        if not checkpoints:
            found.add(
                "registry",
                entry.run_dir,
                f"run {name} has no checkpoint at {entry.run_dir}",
                f"restore the run folder, or register another run: dcgan-pipeline models --work {work}",
            )
            continue
        try:
            load_checkpoint(checkpoints[-1])
        except CheckpointError as exc:
            found.add("registry", checkpoints[-1], f"run {name}: {str(exc)[:160]}", _resume(work, name))
    return found
