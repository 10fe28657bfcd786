"""Training batches from the final WebDataset shards.

Two paths, chosen by a memory budget:
- `CachedImages`: decode every shard once into one uint8 tensor, in GPU memory when
  training on CUDA (3M LSUN images at 64 px are 37 GB; the demo is 37 MB), and draw batches
  from per-epoch permutations that are a pure function of (seed, step). Resuming at step t
  therefore replays exactly the same batches as an uninterrupted run.
- `stream_batches`: a stock WebDataset pipeline with DataLoader workers for sets above the
  budget; shards are resampled at random, with a fixed number of batches per epoch on every
  rank, so a resumed run does not replay the exact sample order (the weights, optimizers and
  noise still resume exactly).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from preprocessing.errors import UserError
from preprocessing.images import SAMPLE_EXT, decode_ppm
from preprocessing.sharding import read_index
from preprocessing.tar_shards import iter_samples

log = logging.getLogger(__name__)


class DataError(UserError):
    """A user-facing problem with the training data."""


def shard_urls(shards: Path, resolution: int) -> tuple[list[str], int]:
    """Shard paths and sample count, after checking the shards match the training resolution."""
    index = read_index(shards)
    if index["resolution"] != resolution:
        raise DataError(
            f"shards in {shards} are {index['resolution']} px but training asked for {resolution} px; "
            f"train with --resolution {index['resolution']} or re-extract at {resolution} px"
        )
    urls = [str(Path(shards) / s["url"]) for s in index["shardlist"]]
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise DataError(f"{len(missing)} shard files listed in the index are missing, e.g. {missing[0]}")
    if index["total"] < 1:
        raise DataError(f"{shards} holds no samples")
    return urls, int(index["total"])


def shard_checksums(shards: Path) -> dict[str, str]:
    """Shard path -> the sha256 recorded when it was written (shards written before checksums: none)."""
    index = read_index(shards)
    return {str(Path(shards) / s["url"]): s["sha256"] for s in index["shardlist"] if s.get("sha256")}


def _decode_shard(url: str, sha256: str | None = None) -> np.ndarray:
    """Decode a shard read once into memory; with `sha256`, refuse bytes that differ from those written."""
    repair = f"rebuild the shards: dcgan-pipeline shard --work {Path(url).parents[1]} --refresh"
    data = Path(url).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"shard {url} does not match the sha256 recorded when it was written (damaged) -> {repair}")
    try:
        images = [decode_ppm(files[SAMPLE_EXT]) for _, files in iter_samples(io.BytesIO(data))]
    except Exception as exc:  # tarfile, KeyError and decode errors all mean a damaged shard
        raise DataError(f"cannot read shard {url}: {type(exc).__name__}: {exc} -> {repair}") from exc
    if not images:
        raise DataError(f"shard {url} holds no samples; rebuild the shards")
    return np.stack(images)


class CachedImages:
    """All samples decoded once into an (N, H, W, 3) uint8 tensor on `device`; batches by (seed, step).

    On CUDA the cache lives in GPU memory and batches are gathered there: no host copy per
    step. Batches come out as (B, 3, H, W) views with channels_last strides, the layout the
    fast training path uses. Under data parallelism, rank r of W takes slice r of the global
    batch (positions (step*W + r)*B ...), so every rank sees distinct images of the same
    epoch permutations: a distributed sampler that keeps resume exact.
    """

    def __init__(
        self,
        urls: list[str],
        total: int,
        seed: int,
        device: torch.device | str = "cpu",
        threads: int = 4,
        checksums: dict[str, str] | None = None,
    ) -> None:
        """Decode `urls` (holding `total` samples, as their index says) straight into the cache.

        Shards are decoded a few at a time and copied into their slice, so host memory holds
        a handful of shards, not a second copy of the set (3M LSUN images at 64 px: 37 GB).
        Each shard with a recorded sha256 in `checksums` is checked in the same read.
        """
        sums = checksums or {}
        self.images = torch.empty(0, dtype=torch.uint8)
        found = 0
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(urls), 2 * threads):
                chunk = urls[start : start + 2 * threads]
                for array in pool.map(_decode_shard, chunk, [sums.get(u) for u in chunk]):
                    if found == 0:
                        self.images = torch.empty((total, *array.shape[1:]), dtype=torch.uint8, device=device)
                    if found + len(array) <= total:
                        self.images[found : found + len(array)].copy_(torch.from_numpy(array))
                    found += len(array)
        if found != total:
            raise DataError(f"the shards hold {found} samples but their index lists {total}; rebuild the shards")
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self), generator=g).to(self.images.device)
        return self._perms[epoch]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The uint8 batch of `step`: positions (step*world + rank)*B ... of the epoch permutations."""
        n = len(self)
        pos = (step * world + rank) * batch_size
        end = pos + batch_size
        parts = []
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(end - pos, n - offset)
            parts.append(self._perm(epoch)[offset : offset + take])
            pos += take
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.images[idx].permute(0, 3, 1, 2)


def _to_chw(sample: dict) -> torch.Tensor:
    return torch.from_numpy(decode_ppm(sample[SAMPLE_EXT]).copy()).permute(2, 0, 1)  # a writable copy


def epoch_batches(total: int, batch_size: int, world: int, workers: int) -> int:
    """Batches every rank yields per epoch when streaming: about total / (batch x world), a multiple of the workers."""
    readers = max(workers, 1)
    per_worker = max(1, -(-total // (batch_size * world * readers)))
    return per_worker * readers


def stream_batches(
    urls: list[str], total: int, batch_size: int, seed: int, workers: int, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """Endless uint8 batches from the shards through WebDataset + DataLoader workers, epoch after epoch.

    Each rank and DataLoader worker draws shards at random with replacement (resampling; WebDataset
    mixes rank, worker id and time into the shard seed), and an epoch is `epoch_batches` batches on
    every rank (`with_epoch`): the ranks of a data-parallel run always take the same number of
    steps, so none waits for another at the gradient all-reduce, whatever the shard sizes. The
    price of resampling: an epoch sees about 1 - 1/e of the samples, not each once. Fewer shards
    than ranks x workers would make readers repeat each other's shard sequences: refused.
    Pinned host memory lets the trainer's copy to the GPU run without blocking.
    """
    readers = world * max(workers, 1)
    if len(urls) < readers:
        raise DataError(
            f"{len(urls)} shards for {world} ranks x {max(workers, 1)} loader workers: streaming needs at least "
            f"{readers}; write more shards (dcgan-pipeline shard --min-shards {readers}) or lower --workers"
        )
    return _epochs(stream_loader(urls, total, batch_size, seed, workers, rank, world))


def stream_loader(
    urls: list[str], total: int, batch_size: int, seed: int, workers: int, rank: int = 0, world: int = 1
) -> torch.utils.data.DataLoader:
    """One epoch per iteration: `epoch_batches(total, batch_size, world, workers)` batches of resampled shards."""
    per_worker = epoch_batches(total, batch_size, world, workers) // max(workers, 1)
    dataset = (
        wds.WebDataset(
            urls, resampled=True, shardshuffle=False, seed=seed + 7919 * rank, nodesplitter=wds.split_by_node
        )
        .shuffle(2000, seed=seed + 7919 * rank)  # per rank: ranks must not pick the same buffer positions
        .map(_to_chw)
        .batched(batch_size, collation_fn=torch.stack, partial=False)
        .with_epoch(per_worker)
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )


def _epochs(loader: torch.utils.data.DataLoader) -> Iterator[torch.Tensor]:
    while True:
        yield from loader
