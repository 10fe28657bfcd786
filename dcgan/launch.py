"""One training process from a JSON config: the entry point torchrun starts on every rank.

    torchrun --standalone --nproc_per_node=8 -m dcgan.launch --config run.json
    # two nodes, on each (node_rank 0 and 1), with a shared file system for shards and runs:
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m dcgan.launch --config run.json

`run.json` holds `TrainConfig` fields (`dcgan.train`); `batch_size` is per process. Rank 0
writes `<run_dir>/result.json` when training ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dcgan.train import config_from_dict, train
from preprocessing.tar_shards import atomic_write_json


def torchrun_command(config: Path, nproc_per_node: int, *, resume: bool = False) -> list[str]:
    """The single-node torchrun command line for `config` (torchrun is torch.distributed.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    return [*cmd, "-m", "dcgan.launch", "--config", str(config), *(["--resume"] if resume else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON file of TrainConfig fields")
    parser.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    cfg = config_from_dict(json.loads(args.config.read_text()))
    result = train(cfg, resume=args.resume, progress=False)
    if rank == 0:
        atomic_write_json(Path(cfg.run_dir) / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
