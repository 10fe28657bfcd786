"""Real 64 px training shards from ../shared's CelebA photos, for runs away from ../shared.

The device machine sees only the checkout and carried folders, so the GPU check carries
these shards: N aligned CelebA photos, center-cropped and resized through the LSUN stage
(an LSUN-format LMDB is written first), then sharded. About 12 KB per 64 px sample.

    python bench/check_shards.py --out gpu_check --count 4000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.lsun import extract_lsun, write_lsun_lmdb  # noqa: E402
from preprocessing.settings import LsunSettings, ShardSettings
from preprocessing.sharding import build_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--celeba", type=Path, default=SHARED / "data" / "celeba" / "celeba-6k.parquet")
    args = parser.parse_args()
    images = pq.read_table(args.celeba, columns=["image"]).column("image").to_pylist()[: args.count]
    scratch = args.out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    write_lsun_lmdb(scratch / "celeba_train_lmdb", images)
    extract_lsun(
        scratch / "celeba_train_lmdb", scratch / "work", LsunSettings(size=args.size, part_size=1000), workers=2
    )
    # at least 8 shards: the GPU check streams them through 8 loader workers (one shard per reader at least)
    build_shards(scratch / "work", ShardSettings(maxcount=1000, min_shards=8))
    shutil.rmtree(args.out / "shards", ignore_errors=True)
    shutil.move(str(scratch / "work" / "shards"), args.out / "shards")
    shutil.rmtree(scratch)
    print(f"{len(images)} CelebA photos -> {args.out / 'shards'}")


if __name__ == "__main__":
    main()
