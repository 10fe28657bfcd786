"""One training process from a JSON config: the entry point torchrun starts on every rank.

    torchrun --standalone --nproc_per_node=8 -m dcgan.launch --config run.json
    # two nodes, on each (node_rank 0 and 1), with a shared file system for shards and runs:
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m dcgan.launch --config run.json

`run.json` holds `TrainConfig` fields (`dcgan.train`); `batch_size` is per process. Rank 0
writes `<run_dir>/result.json` when training ends. `run_training` is what the train flow calls:
in this process, or under torchrun when `nproc_per_node` > 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dcgan.checkpoint import CheckpointError
from dcgan.train import TrainConfig, train
from preprocessing.atomic import atomic_write_json


def torchrun_command(config: Path, nproc_per_node: int, *, resume: bool = False) -> list[str]:
    """The single-node torchrun command line for `config` (torchrun is torch.distributed.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    return [*cmd, "-m", "dcgan.launch", "--config", str(config), *(["--resume"] if resume else [])]


def run_dir_for(work: str | Path, run: str | None, resume: bool) -> Path:
    """The named run, the newest run when resuming, or a new timestamped run."""
    runs = Path(work) / "train"
    if run:
        return runs / run
    if resume:
        existing = sorted((p for p in runs.glob("*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
        if not existing:
            raise CheckpointError(f"nothing to resume: no runs with checkpoints under {runs}")
        return existing[-1]
    return runs / time.strftime("run-%Y%m%d-%H%M%S")


def run_training(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train in this process, or data-parallel under torchrun when `cfg.nproc_per_node` > 1."""
    if cfg.nproc_per_node == 1:
        return train(cfg, resume=resume)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "launch.json"
    config.write_text(cfg.model_dump_json(indent=2) + "\n")
    (run_dir / "result.json").unlink(missing_ok=True)
    cmd = torchrun_command(config, cfg.nproc_per_node, resume=resume)
    log("launching " + " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout or []:  # every rank's log, live in the caller's log
            log(line.rstrip())
            tail = [*tail[-14:], line.rstrip()]
    if proc.returncode != 0 or not (run_dir / "result.json").exists():
        detail = "\n".join(tail)
        raise RuntimeError(f"torchrun training failed with exit status {proc.returncode}:\n{detail}")
    return json.loads((run_dir / "result.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON file of TrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    cfg = TrainConfig.model_validate_json(args.config.read_text())
    result = train(cfg, resume=args.resume, progress=False)
    if rank == 0:
        atomic_write_json(Path(cfg.run_dir) / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
