"""Benchmark: the cost of near-duplicate grouping (hash candidates + verification) from 116k to 3M items.

1. Real codes. The ~116k shared images (CIFAR-10 train + test, Tiny-ImageNet train + val,
   CelebA 6k; read-only from ../shared) are decoded, cut to the dedup stage's 32x32 center
   crop, and hashed by an autoencoder trained as the stage trains it (`train_autoencoder`, on a
   random `--train-items` of them, at most `--max-epochs`); their 16x16 thumbnails are what
   verification reads.
2. Synthetic sets of each `--sizes` N (the real set itself is the first size). Beyond the real
   items, each synthetic item takes the code of a random real item with `--flip-min`..`--flip-max`
   random bits flipped (so the codes keep the real distribution, and siblings of one real code
   land near each other: the hard case for candidate generation), and the thumbnail of another
   random real item, rolled by 4-11 px and mirrored (distinct images: verification must reject
   siblings). Then `--planted` of N are planted near copies of random earlier items: their code
   with 0-3 bits flipped and their thumbnail plus Gaussian noise (sd 2 grey levels), with the
   pair recorded. Thumbnails are written to a memory-mapped .npy under `--scratch`, as the stage
   stores them (the crops are not needed to group).
3. Each size is grouped in a fresh child process at the stage's defaults (`DedupSettings()`),
   exactly as `group_items` calls it, timing `group_near_duplicates` and reading the child's peak
   RSS (VmHWM, which counts the memory-mapped thumbnail pages it touched). Printed per size:
   seconds, items/s, candidate and verified pairs, buckets split, peak RSS, and the share of
   planted pairs that ended in one group; then the cost per item relative to the first size.

    python bench/dedup_scale.py                          # sizes 116k (real), 1M, 3M
    python bench/dedup_scale.py --sizes 0,200000 --quick # smoke run; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

# Run as `python bench/dedup_scale.py`, this file's folder comes first on sys.path: drop it so that
# `dedup` is the package, not bench/dedup.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.modules.pop("dedup", None)

from dedup.autoencoder import AEConfig, encode_bits, train_autoencoder  # noqa: E402
from dedup.contrast import thumbnails  # noqa: E402
from dedup.grouping import group_near_duplicates  # noqa: E402
from dedup.settings import DedupSettings  # noqa: E402
from dedup.stage import to_crop32  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TABLES = (
    DATA / "cifar10" / "train.parquet",
    DATA / "cifar10" / "test.parquet",
    DATA / "tinyimagenet" / "train-50k.parquet",
    DATA / "tinyimagenet" / "val-2k.parquet",
    DATA / "celeba" / "celeba-6k.parquet",
)
BLOCK = 65536


def real_crops(limit: int | None) -> np.ndarray:
    """32x32 center crops of every shared image (the first `limit` per table with --quick)."""
    crops = []
    for path in TABLES:
        pf = pq.ParquetFile(path)
        taken = 0
        for batch in pf.iter_batches(columns=["image"], batch_size=4096):
            for data in batch.column(0).to_pylist():
                crops.append(to_crop32(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
                taken += 1
                if limit is not None and taken >= limit:
                    break
            if limit is not None and taken >= limit:
                break
    return np.stack(crops)


def flip_bits(codes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip `counts[k]` distinct random bits of code k."""
    bits = np.unpackbits(codes, axis=1)
    order = np.argsort(rng.random(bits.shape), axis=1)  # a random permutation of bit positions per row
    flip = np.arange(128)[None, :] < counts[:, None]
    rows = np.repeat(np.arange(len(codes)), 128).reshape(len(codes), 128)
    bits[rows[flip], order[flip]] ^= 1
    return np.packbits(bits, axis=1)


def build_set(
    n: int, real_codes: np.ndarray, real_thumbs: np.ndarray, args: argparse.Namespace, out: Path
) -> tuple[Path, Path, Path]:
    """codes (N, 16), thumbnails (N, 16, 16, 3) memory-mapped, planted pairs (P, 2): three .npy files."""
    rng = np.random.default_rng(args.seed + n)
    m = len(real_codes)
    planted = int(round(args.planted * n))
    base = max(m, n - planted)  # real items, then synthetic distinct items, then the planted copies
    codes = np.empty((base + planted, 16), np.uint8)
    thumbs_path = out / f"thumbs_{n}.npy"
    thumbs = np.lib.format.open_memmap(thumbs_path, mode="w+", dtype=np.uint8, shape=(base + planted, 16, 16, 3))
    codes[:m] = real_codes
    thumbs[:m] = real_thumbs
    for s in range(m, base, BLOCK):
        e = min(base, s + BLOCK)
        src = rng.integers(0, m, e - s)
        codes[s:e] = flip_bits(real_codes[src], rng.integers(args.flip_min, args.flip_max + 1, e - s), rng)
        other = rng.integers(0, m, e - s)
        dy, dx = (int(v) for v in rng.integers(4, 12, 2))
        thumbs[s:e] = np.roll(real_thumbs[other], (dy, dx), axis=(1, 2))[:, :, ::-1]
    originals = np.sort(rng.choice(base, planted, replace=False)) if planted else np.zeros(0, np.int64)
    for s in range(0, planted, BLOCK):
        o = originals[s : s + BLOCK]
        at = base + s
        codes[at : at + len(o)] = flip_bits(codes[o], rng.integers(0, 4, len(o)), rng)
        noisy = np.asarray(thumbs[o]).astype(np.float32) + rng.normal(0, 2, (len(o), 16, 16, 3))
        thumbs[at : at + len(o)] = np.clip(noisy.round(), 0, 255).astype(np.uint8)
    thumbs.flush()
    del thumbs
    pairs = np.stack([originals, base + np.arange(planted)], axis=1)
    codes_path, pairs_path = out / f"codes_{n}.npy", out / f"planted_{n}.npy"
    np.save(codes_path, codes)
    np.save(pairs_path, pairs)
    return codes_path, thumbs_path, pairs_path


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(codes_path: Path, thumbs_path: Path, pairs_path: Path) -> None:
    """Group one set at the stage's defaults and print one JSON line."""
    settings = DedupSettings()
    codes = np.load(codes_path)
    thumbs = np.load(thumbs_path, mmap_mode="r")
    pairs = np.load(pairs_path)
    t0 = time.perf_counter()
    g = group_near_duplicates(codes, thumbs, radius=settings.radius, rule=settings.rule(), cap=settings.bucket_cap)
    seconds = time.perf_counter() - t0
    found = float(np.mean(g.group[pairs[:, 0]] == g.group[pairs[:, 1]])) if len(pairs) else float("nan")
    c = g.candidates
    print(
        json.dumps(
            {
                "items": len(codes),
                "seconds": seconds,
                "candidate_pairs": g.candidate_pairs,
                "verified_pairs": g.verified_pairs,
                "buckets_split": c.buckets_split,
                "buckets_windowed": c.buckets_windowed,
                "largest_bucket": c.largest_bucket,
                "planted": len(pairs),
                "planted_found": found,
                "peak_rss_gb": peak_rss_gb(),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0,1000000,3000000", help="set sizes; 0 = the real set alone")
    ap.add_argument("--train-items", type=int, default=50_000, help="autoencoder training subset of the real crops")
    ap.add_argument("--max-epochs", type=int, default=10)
    ap.add_argument("--flip-min", type=int, default=1)
    ap.add_argument("--flip-max", type=int, default=4)
    ap.add_argument("--planted", type=float, default=0.01, help="share of each set that is planted near copies")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/dedup_scale"), help="where the sets are written")
    ap.add_argument("--quick", action="store_true", help="2,000 images per table, 2 epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    torch.manual_seed(args.seed)
    args.scratch.mkdir(parents=True, exist_ok=True)
    settings = DedupSettings()
    print(
        f"# Near-duplicate grouping at scale ({date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, numpy {np.__version__}, "
        f"load avg {os.getloadavg()[0]:.1f})"
    )
    print(f"command: python bench/dedup_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"defaults grouped with: radius {settings.radius}, min_similarity {settings.min_similarity}, "
        f"bucket_cap {settings.bucket_cap}"
    )
    t0 = time.perf_counter()
    crops = real_crops(2000 if args.quick else None)
    print(f"\n{len(crops)} real crops decoded in {time.perf_counter() - t0:.0f} s")
    rng = np.random.default_rng(args.seed)
    train = crops[np.sort(rng.permutation(len(crops))[: args.train_items])]
    t0 = time.perf_counter()
    model, info = train_autoencoder(train, AEConfig(max_epochs=2 if args.quick else args.max_epochs))
    print(f"autoencoder: {len(train)} crops, {len(info['epochs'])} epochs in {time.perf_counter() - t0:.0f} s")
    real_codes = encode_bits(model, crops)
    real_thumbs = thumbnails(crops)
    del crops
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        paths = build_set(size, real_codes, real_thumbs, args, args.scratch)
        built = time.perf_counter() - t0
        out = subprocess.run(
            [sys.executable, __file__, "--child", *map(str, paths)], check=True, capture_output=True, text=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["disk_gb"] = sum(p.stat().st_size for p in paths) / 2**30
        rows.append(row)
        print(f"set of {row['items']:,} built in {built:.0f} s, grouped in {row['seconds']:.1f} s", flush=True)
        for p in paths:
            p.unlink()
    print(
        "\n| items | seconds | items/s | s per 1M items | x per item vs first | candidate pairs | verified | "
        "buckets split | peak RSS GB | set on disk GB | planted pairs found |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first = rows[0]["seconds"] / rows[0]["items"]
    for r in rows:
        per = r["seconds"] / r["items"]
        print(
            f"| {r['items']:,} | {r['seconds']:.1f} | {r['items'] / r['seconds']:,.0f} | {per * 1e6:.1f} | "
            f"{per / first:.2f} | {r['candidate_pairs']:,} | {r['verified_pairs']:,} | {r['buckets_split']:,} | "
            f"{r['peak_rss_gb']:.2f} | {r['disk_gb']:.2f} | {r['planted_found']:.4f} of {r['planted']:,} |"
        )
    print(
        "\nTargets: 1M items under 120 s, 3M under 480 s, peak RSS under 6 GB, planted pairs found; "
        f"load avg at end {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
