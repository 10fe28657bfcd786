"""Streaming training data under data parallelism: equal epochs on every rank, resampling's coverage, bad splits."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan.data import DataError, epoch_batches, shard_urls, stream_batches, stream_loader
from preprocessing.settings import ShardSettings
from preprocessing.sharding import build_shards

EPOCHS, BATCH = 12, 10


def _rank(rank: int, world: int, port: int, urls: list[str], total: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loader = stream_loader(urls, total, BATCH, seed=0, workers=0, rank=rank, world=world)
    epochs = []
    for _ in range(EPOCHS):  # each iteration of the loader is one epoch
        batches = list(loader)
        epochs.append([hashlib.sha1(img.numpy().tobytes()).hexdigest() for b in batches for img in b])
    Path(out, f"rank{rank}.json").write_text(json.dumps(epochs))
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_take_equal_epochs_and_see_what_resampling_predicts(shards_dir: Path, tmp_path: Path) -> None:
    urls, total = shard_urls(shards_dir, 32)
    mp.spawn(_rank, args=(2, _port(), urls, total, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_epoch = epoch_batches(total, BATCH, 2, 0)
    assert per_epoch == 3  # ceil(60 / (10 x 2))
    for epoch in range(EPOCHS):  # every rank yields the same number of batches in every epoch
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == per_epoch * BATCH
    # Resampling draws shards with replacement and the shuffle buffer mixes several of them, so one epoch
    # of D = 60 draws (2 ranks x 3 batches x 10) behaves like sampling the N = 60 samples with
    # replacement: an expected 1 - (1 - 1/N)^D = 0.636 of them distinct, not all of them.
    seen = [len(set(ranks[0][e]) | set(ranks[1][e])) / total for e in range(EPOCHS)]
    draws = 2 * per_epoch * BATCH
    expected = 1 - (1 - 1 / total) ** draws
    print(f"distinct share per epoch {np.round(seen, 3).tolist()} mean {np.mean(seen):.3f}, predicted {expected:.3f}")
    assert max(seen) < 1.0  # not a disjoint split that sees every sample once
    assert abs(np.mean(seen) - expected) < 0.06, (seen, expected)


def test_fewer_shards_than_ranks_times_workers_is_refused_and_min_shards_writes_more(
    shards_dir: Path, tmp_path: Path
) -> None:
    urls, total = shard_urls(shards_dir, 32)
    assert len(urls) == 3
    with pytest.raises(DataError, match=r"3 shards for 2 ranks x 2 loader workers: .* --min-shards 4"):
        stream_batches(urls, total, BATCH, seed=0, workers=2, rank=0, world=2)  # refused at once, not at first use
    import shutil

    work = tmp_path / "work"
    shutil.copytree(shards_dir.parent / "extract", work / "extract")
    index = build_shards(work, ShardSettings(maxcount=25, min_shards=4))
    assert len(index["shardlist"]) == 4 and index["total"] == 60 and index["samples_per_shard"] == 15
    assert build_shards(work, ShardSettings(maxcount=25, min_shards=4))["added"] == 0  # up to date, no rebuild
    urls4, _ = shard_urls(work / "shards", 32)
    assert next(stream_batches(urls4, total, BATCH, seed=0, workers=2, rank=0, world=2)).shape == (BATCH, 3, 32, 32)
