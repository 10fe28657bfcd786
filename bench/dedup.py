"""Benchmark: near-duplicate detection with the paper's autoencoder hash against byte and perceptual hashes.

1. Data. Originals are real photos from `shared/data` (read-only, never copied): CIFAR-10 test
   (32x32 JPEG), Tiny-ImageNet val (64x64 JPEG) and the first `--celeba` CelebA photos (178x218
   JPEG). Distinct originals must really be distinct, and these sets are not: CelebA and CIFAR-10
   test hold the same photo more than once (re-crops, recolours). So an original is dropped when
   its 32x32 crop is pixel-identical to another's, or (`--clean-corr`, default 0.95; 0 turns it
   off) when its grey 32x32 crop has Pearson correlation >= that with another original of the
   same source; one original per connected cluster is kept. This rule uses neither hash.
   A random `--dup-frac` of the originals gets `--copies` transformed copies, each through a
   different transform (below) made at the native size from the decoded original and saved as a
   new file. Every item (original or copy) is then decoded at native size with `decode_rgb` and
   cut to the paper's 32x32 center crop with `to_crop32`, as the dedup stage does.
   Transforms: `copy` (byte-identical file), `png` (lossless re-save: same pixels, other bytes),
   `jpeg_low` (JPEG q 30-60), `jpeg_high` (JPEG q 80-95), `webp` (WebP q 50-90), `rescale`
   (down by 0.5-0.75 with INTER_AREA, back up with INTER_CUBIC), `shift` (crop 1-3 px off one
   horizontal and one vertical side), `brightness` (+-5-15 grey levels) and `contrast` (x0.85-0.93
   or x1.07-1.15 about the mean). The last four are saved losslessly (PNG), so each copy differs
   from its original by that one change only.
2. Training. `train_autoencoder` with `AEConfig()` defaults on `--train-on eval` (default): the
   evaluated crops themselves, copies included, which is what the dedup stage does (dedup is
   transductive: it fits the hash on the collection it deduplicates); or `--train-on disjoint`:
   per source as many crops as it has evaluated items, from sets disjoint from them (CIFAR-10
   train, Tiny-ImageNet train, CelebA photos after the first `--celeba`; at the default
   `--celeba 6000` there are none left, so that training set has no faces), no copies.
3. Quality. Pair-level precision and recall: a pair is predicted duplicate when both items land
   in the same group, true when both derive from the same original.
   Pairs are counted from group and family sizes, never enumerated. Methods: ours,
   `group_near_duplicates` as the stage calls it (pixel-identical crops merged first, candidates
   within radius 0..`--radii` verified on the thumbnails at each of `--similarities`, and "hash
   only", which merges every candidate); sha1 of the file bytes; `imagehash.phash` (64 bits) of
   the 32x32 crop and of the decoded image at native size, grouped transitively: connected
   components of the pairs within the Hamming threshold 0..12 (found by brute force with numpy
   popcount). Ours (stars around keepers) without a bucket cap is checked against the same rule
   on brute-force pairs (stars over all verified pairs within the radius) at the default
   threshold and hash only; the script says at which radii the default cap changed the groups.
   Per-transform recall = share of (original, copy) pairs of that transform that end up in one
   group, at each method's operating point (the threshold with the best recall at precision >=
   0.99) and at our defaults.
4. Speed. Hashing from decoded 32x32 crops: `encode_bits` on `--encode-items` crops (the
   evaluated crops tiled; median of 3), the stage's whole per-item work (hash, thumbnails, pixel
   digests, grouping with verification at the defaults) on the evaluated crops, against
   `imagehash.phash` on PIL images of the same crops (one process, as imagehash is used; median
   of 3 on `--phash-items`). Grouping times are per call on the evaluated set.

    python bench/dedup.py            # full: ~25k items, AEConfig() defaults
    python bench/dedup.py --quick    # smoke run: ~1.4k items, 3 training epochs; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

# Run as `python bench/dedup.py`, this file's folder comes first on sys.path and `dedup` would
# import this script instead of the package: drop the folder before importing the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.modules.pop("dedup", None)

from dedup.autoencoder import AEConfig, encode_bits, train_autoencoder  # noqa: E402
from dedup.contrast import CONTRAST_FLOOR, ThumbStats, thumbnails  # noqa: E402
from dedup.grouping import Grouping, components, first_of_equal, group_near_duplicates, stars  # noqa: E402
from dedup.settings import DedupSettings  # noqa: E402
from dedup.stage import to_crop32  # noqa: E402
from dedup.verify import VerifyRule, verify_pairs  # noqa: E402
from preprocessing.images import decode_rgb  # noqa: E402
from preprocessing.preview import tile  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
SOURCES = {  # name -> (evaluated parquet, disjoint parquet for --train-on disjoint)
    "cifar10": (DATA / "cifar10" / "test.parquet", DATA / "cifar10" / "train.parquet"),
    "tinyimagenet": (DATA / "tinyimagenet" / "val-2k.parquet", DATA / "tinyimagenet" / "train-50k.parquet"),
    "celeba": (DATA / "celeba" / "celeba-6k.parquet", None),  # disjoint = the photos beyond --celeba
}
TRANSFORMS = ("copy", "png", "jpeg_low", "jpeg_high", "webp", "rescale", "shift", "brightness", "contrast")
TARGET_PRECISION = 0.99
TARGET_RATE = 20_000  # items/s of our hashing plus verification from decoded crops
DEFAULT = DedupSettings()


# ----------------------------------------------------------------------------------------------- data


def _encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_copy(name: str, data: bytes, rgb: np.ndarray, rng: np.random.Generator) -> tuple[bytes, dict[str, float]]:
    """One transformed copy of an original (file bytes, decoded RGB at native size); returns (bytes, params)."""
    h, w = rgb.shape[:2]
    if name == "copy":
        return data, {}
    if name == "png":
        return _encode(rgb, "PNG"), {}
    if name in ("jpeg_low", "jpeg_high"):
        q = int(rng.integers(30, 61) if name == "jpeg_low" else rng.integers(80, 96))
        return _encode(rgb, "JPEG", quality=q), {"quality": q}
    if name == "webp":
        q = int(rng.integers(50, 91))
        return _encode(rgb, "WEBP", quality=q), {"quality": q}
    if name == "rescale":
        f = float(rng.uniform(0.5, 0.75))
        small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return _encode(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), "PNG"), {"factor": f}
    if name == "shift":
        dx, dy = (int(v) for v in rng.integers(1, 4, size=2))
        left, top = (dx if rng.random() < 0.5 else 0), (dy if rng.random() < 0.5 else 0)
        right, bottom = dx - left, dy - top
        return _encode(np.ascontiguousarray(rgb[top : h - bottom, left : w - right]), "PNG"), {"dx": dx, "dy": dy}
    if name == "brightness":
        beta = float(rng.uniform(5, 15)) * (1 if rng.random() < 0.5 else -1)
        out = np.clip(rgb.astype(np.float32) + beta, 0, 255).round().astype(np.uint8)
        return _encode(out, "PNG"), {"beta": beta}
    if name == "contrast":
        alpha = float(rng.uniform(0.85, 0.93) if rng.random() < 0.5 else rng.uniform(1.07, 1.15))
        x = rgb.astype(np.float32)
        out = np.clip((x - x.mean()) * alpha + x.mean(), 0, 255).round().astype(np.uint8)
        return _encode(out, "PNG"), {"alpha": alpha}
    raise ValueError(name)


@dataclass
class Items:
    data: list[bytes] = field(default_factory=list)  # file bytes
    crops: list[np.ndarray] = field(default_factory=list)  # 32x32 crops
    family: list[int] = field(default_factory=list)  # index of the original it derives from
    transform: list[str] = field(default_factory=list)  # "original" or a TRANSFORMS name
    source: list[str] = field(default_factory=list)
    phash_native: list[int] = field(default_factory=list)  # phash of the decoded image at native size
    phash_native_s: float = 0.0  # seconds spent in those phash calls


def _phash_int(img: Image.Image) -> int:
    return int(str(imagehash.phash(img)), 16)


def _add(items: Items, data: bytes, family: int, transform: str, source: str, rgb: np.ndarray | None = None) -> None:
    rgb = decode_rgb(data)[0] if rgb is None else rgb
    items.data.append(data)
    items.crops.append(to_crop32(rgb))
    items.family.append(family)
    items.transform.append(transform)
    items.source.append(source)
    t0 = time.perf_counter()
    items.phash_native.append(_phash_int(Image.fromarray(rgb)))
    items.phash_native_s += time.perf_counter() - t0


def _read(path: Path, n: int | None, rng: np.random.Generator, skip: int = 0) -> list[bytes]:
    images = pq.read_table(path, columns=["image"])["image"].to_pylist()[skip:]
    if n is not None and n < len(images):
        images = [images[i] for i in np.sort(rng.choice(len(images), n, replace=False))]
    return images


def internal_duplicates(crops: np.ndarray, min_corr: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j of crops whose grey 32x32 pixels correlate >= min_corr (Pearson): the same photo twice."""
    g = crops.astype(np.float32).mean(axis=3).reshape(len(crops), -1)
    g -= g.mean(axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-6
    ii, jj = [], []
    for s in range(0, len(g), block):
        a, b = np.nonzero(g[s : s + block] @ g.T >= min_corr)
        keep = b > a + s
        ii.append(a[keep] + s)
        jj.append(b[keep])
    return np.concatenate(ii), np.concatenate(jj)


def build_items(counts: dict[str, int], dup_frac: float, copies: int, seed: int, min_corr: float) -> tuple[Items, dict]:
    rng = np.random.default_rng(seed)
    pool = Items()  # every candidate original, before the clean-up
    for name, n in counts.items():
        if n > 0:
            path, other = SOURCES[name]
            # CelebA has no second set: evaluate its first n photos, so --train-on disjoint can use the rest
            images = _read(path, n, rng) if other is not None else _read(path, None, rng)[:n]
            for data in images:
                _add(pool, data, len(pool.data), "original", name)
    crops = np.stack(pool.crops)
    # Distinct originals must really be distinct: pixel-identical crops, and (min_corr > 0) near-identical
    # ones within a source (CelebA and CIFAR-10 test hold the same photo more than once), keep one each.
    digests = [hashlib.sha1(c.tobytes()).digest() for c in crops]
    ii, jj = [], []
    first: dict[bytes, int] = {}
    for k, dg in enumerate(digests):
        if first.setdefault(dg, k) != k:
            ii.append(first[dg])
            jj.append(k)
    identical = len(ii)
    ii, jj = np.array(ii, np.int64), np.array(jj, np.int64)
    if min_corr > 0:
        src = np.array(pool.source)
        for name in counts:
            idx = np.flatnonzero(src == name)
            if len(idx) > 1:
                a, b = internal_duplicates(crops[idx], min_corr)
                ii, jj = np.r_[ii, idx[a]], np.r_[jj, idx[b]]
    kept = components(len(crops), ii, jj) == np.arange(len(crops))
    dropped = {name: int((~kept & (np.array(pool.source) == name)).sum()) for name in counts}
    items = Items(phash_native_s=pool.phash_native_s * kept.mean())
    for k in np.flatnonzero(kept).tolist():
        items.data.append(pool.data[k])
        items.crops.append(pool.crops[k])
        items.family.append(len(items.family))
        items.transform.append("original")
        items.source.append(pool.source[k])
        items.phash_native.append(pool.phash_native[k])
    n_orig = len(items.data)
    dup = np.sort(rng.choice(n_orig, round(dup_frac * n_orig), replace=False))
    params: dict[str, list[dict[str, float]]] = {t: [] for t in TRANSFORMS}
    for i in dup.tolist():
        rgb = decode_rgb(items.data[i])[0]
        for t in rng.choice(TRANSFORMS, copies, replace=False).tolist():
            data, p = make_copy(t, items.data[i], rgb, rng)
            params[t].append(p)
            _add(items, data, i, t, items.source[i])
    meta = {
        "originals": n_orig,
        "identical_pairs": identical,
        "near_identical_pairs": len(ii) - identical,
        "dropped": dropped,
        "duplicated_originals": len(dup),
        "params": params,
    }
    return items, meta


def disjoint_crops(per_source: dict[str, int], evaluated_celeba: int, seed: int) -> np.ndarray:
    """Crops from sets disjoint from the evaluated ones: per source, as many as it has evaluated items
    (originals and copies), capped by the disjoint pool (CelebA: the photos after the first `evaluated_celeba`)."""
    rng = np.random.default_rng(seed + 1)
    crops = []
    for name, n in per_source.items():
        evaluated, other = SOURCES[name]
        if other is None:
            images = _read(evaluated, None, rng)[evaluated_celeba:]
            images = [images[i] for i in np.sort(rng.permutation(len(images))[:n])]
        else:
            images = _read(other, n, rng)
        crops += [to_crop32(decode_rgb(d)[0]) for d in images]
    return np.stack(crops)


# -------------------------------------------------------------------------------------------- metrics


def _choose2(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def pair_scores(group: np.ndarray, family: np.ndarray) -> tuple[int, int, int]:
    """(predicted pairs, true predicted pairs, true pairs), counted from group/family sizes."""
    predicted = _choose2(np.unique(group, return_counts=True)[1])
    cell = group.astype(np.int64) * (int(family.max()) + 1) + family
    hits = _choose2(np.unique(cell, return_counts=True)[1])
    truth = _choose2(np.unique(family, return_counts=True)[1])
    return predicted, hits, truth


def brute_stars(n: int, first: np.ndarray, i: np.ndarray, j: np.ndarray, linked: np.ndarray) -> np.ndarray:
    """The stage's rule from brute-force pairs: identical crops join their first copy, the others form stars
    (in index order) over the verified pairs between first copies."""
    reps = np.flatnonzero(first == np.arange(n))
    both = linked & (first[i] == i) & (first[j] == j)
    keeper = stars(len(reps), np.searchsorted(reps, i[both]), np.searchsorted(reps, j[both]))
    head = first.copy()
    head[reps] = reps[keeper]
    return head[head]


def close_pairs(words: np.ndarray, max_dist: int, block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming distance <= max_dist, by brute force: (i, j, distance)."""
    n = len(words)
    ii, jj, dd = [], [], []
    for s in range(0, n, block):
        e = min(n, s + block)
        d = np.zeros((e - s, n), np.uint8)
        for w in range(words.shape[1]):
            d += np.bitwise_count(words[s:e, w, None] ^ words[None, :, w]).astype(np.uint8)
        a, b = np.nonzero(d <= max_dist)
        keep = b > a + s
        ii.append(a[keep] + s)
        jj.append(b[keep])
        dd.append(d[a[keep], b[keep]])
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)


def as_words(packed: np.ndarray) -> np.ndarray:
    """(N, 8k) uint8 -> (N, k) uint64 (byte order is irrelevant for Hamming distance)."""
    return np.ascontiguousarray(packed).view(np.uint64)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(np.unique(a)) == len(np.unique(b)) == len(np.unique(a.astype(np.int64) * (len(b) + 1) + b))


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Row:
    method: str
    threshold: int | None
    predicted: int
    hits: int
    truth: int
    group_s: float
    hash_s: float
    groups: np.ndarray = field(repr=False, default=None)
    grouping: Grouping | None = field(repr=False, default=None)

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.hits / self.truth if self.truth else 1.0


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small N, 3 epochs; numbers mean nothing")
    ap.add_argument("--cifar", type=int, default=10_000, help="CIFAR-10 test originals (of 10000)")
    ap.add_argument("--tiny", type=int, default=2020, help="Tiny-ImageNet val originals (of 2020)")
    ap.add_argument("--celeba", type=int, default=6000, help="CelebA originals (of 6000)")
    ap.add_argument("--dup-frac", type=float, default=0.2, help="share of originals that get copies")
    ap.add_argument("--copies", type=int, default=2, help="copies per duplicated original, distinct transforms")
    ap.add_argument(
        "--clean-corr",
        type=float,
        default=0.95,
        help="drop originals whose grey crop correlates >= this with another of their source (0: identical only)",
    )
    ap.add_argument("--train-on", choices=("eval", "disjoint"), default="eval")
    ap.add_argument("--max-epochs", type=int, default=None, help="override AEConfig.max_epochs (default: keep)")
    ap.add_argument("--radii", type=int, default=16, help="ours: radius 0..R")
    ap.add_argument("--similarities", default="0.9,0.92,0.94,0.96,0.98", help="ours: verification thresholds to try")
    ap.add_argument("--phash-max", type=int, default=12, help="phash: threshold 0..T")
    ap.add_argument("--encode-items", type=int, default=50_000)
    ap.add_argument("--phash-items", type=int, default=5000)
    ap.add_argument("--fp-sheet", type=Path, default=None, help="write a PNG of false-positive pairs of ours here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.cifar, args.tiny, args.celeba = min(args.cifar, 600), min(args.tiny, 200), min(args.celeba, 300)
        args.encode_items, args.phash_items = min(args.encode_items, 5000), min(args.phash_items, 500)
        args.max_epochs = args.max_epochs or 3
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    counts = {"cifar10": args.cifar, "tinyimagenet": args.tiny, "celeba": args.celeba}
    similarities = [float(v) for v in args.similarities.split(",")]
    capped: list[tuple[float, int]] = []

    print(
        f"# Near-duplicate benchmark ({date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} threads={torch.get_num_threads()}, "
        f"imagehash {imagehash.__version__}, numpy {np.__version__}, load avg {os.getloadavg()[0]:.1f})"
    )
    print(f"command: python bench/dedup.py {' '.join(sys.argv[1:] if argv is None else argv)}")

    t0 = time.perf_counter()
    items, meta = build_items(counts, args.dup_frac, args.copies, args.seed, args.clean_corr)
    crops = np.stack(items.crops)
    family = np.array(items.family, np.int64)
    transform = np.array(items.transform)
    source = np.array(items.source)
    n = len(crops)
    truth_pairs = pair_scores(np.arange(n), family)[2]
    per_source = ", ".join(f"{s} {int(((source == s) & (transform == 'original')).sum())}" for s in counts)
    print(
        f"\ndataset built in {time.perf_counter() - t0:.1f} s: {n} items = {meta['originals']} originals "
        f"({per_source}; dropped as duplicates of another original: {meta['dropped']}, from "
        f"{meta['identical_pairs']} pixel-identical and {meta['near_identical_pairs']} near-identical pairs "
        f"(grey-crop correlation >= {args.clean_corr})) + "
        f"{n - meta['originals']} copies of {meta['duplicated_originals']} originals; {truth_pairs} true pairs"
    )
    print("\n| transform | copies | parameters (range seen) |\n|---|---|---|")
    for t in TRANSFORMS:
        ps = meta["params"][t]
        rng_txt = (
            ", ".join(f"{k} {min(p[k] for p in ps):.3g} .. {max(p[k] for p in ps):.3g}" for k in ps[0]) if ps else ""
        )
        print(f"| {t} | {len(ps)} | {rng_txt} |")

    # --- train
    cfg = AEConfig()
    if args.max_epochs is not None:
        cfg.max_epochs = args.max_epochs
    if args.train_on == "eval":
        train_set = crops
    else:
        train_set = disjoint_crops({s: int((source == s).sum()) for s in counts}, args.celeba, args.seed)
    t0 = time.perf_counter()
    model, info = train_autoencoder(train_set, cfg)
    train_s = time.perf_counter() - t0
    print(
        f"\nautoencoder: trained on {args.train_on} ({len(train_set)} crops) in {train_s:.0f} s, "
        f"{len(info['epochs'])} epochs, best held-out MSE {info['best_holdout_mse']:.5f}; config {asdict(cfg)}"
    )

    # --- hashes
    rows: list[Row] = []
    t0 = time.perf_counter()
    codes = encode_bits(model, crops)
    ours_hash_s = time.perf_counter() - t0
    bits = np.unpackbits(codes, axis=1)
    active = bits.sum(1)
    print(
        f"our codes: active bits per code median {int(np.median(active))} (min {active.min()}, max {active.max()}); "
        f"{int((bits.sum(0) == 0).sum())} code units never active, {int((bits.sum(0) == n).sum())} always active; "
        f"{int((active == 0).sum())} all-zero codes"
    )
    t0 = time.perf_counter()
    thumbs = thumbnails(crops)
    ours_hash_s += time.perf_counter() - t0
    stats = ThumbStats.of(thumbs)
    low = stats.std < CONTRAST_FLOOR
    print(f"low-content crops (thumbnail spread < {CONTRAST_FLOOR:g} grey levels): {int(low.sum())}")
    content = [hashlib.sha1(c.tobytes()).digest() for c in crops]
    brute_i, brute_j, brute_d = close_pairs(as_words(codes), args.radii)
    first = first_of_equal(pa.array(content, type=pa.binary()))
    mismatched = []
    for t in [-1.0, *similarities]:
        rule = VerifyRule(min_similarity=t)
        verdict = verify_pairs(thumbs, stats, brute_i, brute_j, rule)
        method = "ours: hash only" if t < 0 else f"ours: verify >= {t:g}"
        for r in range(args.radii + 1):
            t0 = time.perf_counter()
            g = group_near_duplicates(codes, thumbs, radius=r, rule=rule, content=content, stats=stats)
            gs = time.perf_counter() - t0
            if t in (-1.0, DEFAULT.min_similarity):  # cross-check against brute force, no bucket cap
                exact = group_near_duplicates(codes, thumbs, radius=r, rule=rule, content=content, cap=n + 1)
                ref = brute_stars(n, first, brute_i, brute_j, (brute_d <= r) & verdict.ok)
                if not same_partition(exact.group, ref):
                    mismatched.append((t, r))
                if not same_partition(exact.group, g.group):
                    capped.append((t, r))
            rows.append(Row(method, r, *pair_scores(g.group, family), gs, ours_hash_s, g.group, g))
    print(
        "grouping (no bucket cap) vs brute-force stars over all verified pairs within the radius: "
        + (f"DIFFERENT at {mismatched}" if mismatched else f"identical at every radius 0..{args.radii}")
        + f"; the default cap of {DEFAULT.bucket_cap} changed the groups at {capped or 'no radius'}"
    )

    t0 = time.perf_counter()
    digests = [hashlib.sha1(d).digest() for d in items.data]
    sha_hash_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sha_group = _first_index(np.unique(np.array(digests, dtype=object), return_inverse=True)[1])
    sha_s = time.perf_counter() - t0
    rows.append(Row("sha1 bytes", None, *pair_scores(sha_group, family), sha_s, sha_hash_s, sha_group))

    t0 = time.perf_counter()
    ph_crop = np.array([_phash_int(Image.fromarray(c)) for c in crops], np.uint64)
    ph_crop_s = time.perf_counter() - t0
    ph_native = np.array(items.phash_native, np.uint64)
    for label, ph, hs in (("phash crop32", ph_crop, ph_crop_s), ("phash native", ph_native, items.phash_native_s)):
        t0 = time.perf_counter()
        pi, pj, pd = close_pairs(ph[:, None], args.phash_max)
        brute_s = time.perf_counter() - t0
        for t in range(args.phash_max + 1):
            t0 = time.perf_counter()
            m = pd <= t
            grp = components(n, pi[m], pj[m])
            rows.append(Row(label, t, *pair_scores(grp, family), brute_s + time.perf_counter() - t0, hs, grp))

    # --- tables
    print(f"\n## Pair-level precision / recall (N = {n}, {truth_pairs} true pairs)\n")
    print(
        "Group s: one grouping call on the N items (phash: brute-force pair search + components); "
        "items/s: N / (hash + group) from decoded crops (sha1: from file bytes; "
        "phash native: from the decoded image).\n"
    )
    default_method = f"ours: verify >= {DEFAULT.min_similarity:g}"
    print(
        "ours: candidates within the Hamming radius (threshold column), merged when their thumbnails correlate "
        "at least the verification threshold; `hash only` merges every candidate. Only the default threshold "
        "and hash only are listed; every threshold is in the grid below.\n"
    )
    print("| method | threshold | precision | recall | predicted pairs | true predicted | group s | items/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.method.startswith("ours: verify") and row.method != default_method:
            continue
        rate = n / (row.hash_s + row.group_s)
        thr = "-" if row.threshold is None else row.threshold
        print(
            f"| {row.method} | {thr} | {row.precision:.5f} | {row.recall:.4f} | {row.predicted} | {row.hits} | "
            f"{row.group_s:.2f} | {rate:,.0f} |"
        )

    print("\n## ours: precision / recall by radius (rows) and verification threshold (columns)\n")
    ours_methods = [m for m in dict.fromkeys(r.method for r in rows) if m.startswith("ours")]
    print("| radius | " + " | ".join(ours_methods) + " |\n|---|" + "---|" * len(ours_methods))
    for r in range(args.radii + 1):
        cells = []
        for mth in ours_methods:
            row = next(x for x in rows if x.method == mth and x.threshold == r)
            cells.append(f"{row.precision:.4f} / {row.recall:.4f}")
        print(f"| {r} | " + " | ".join(cells) + " |")
    g = next(x for x in rows if x.method == default_method and x.threshold == DEFAULT.radius).grouping
    print(
        f"\nAt the defaults (radius {DEFAULT.radius}, verify >= {DEFAULT.min_similarity:g}): "
        f"{g.identical_pairs} pixel-identical items, {g.candidate_pairs} candidate pairs, {g.verified_pairs} "
        f"verified, {g.rejected_pairs} rejected ({g.low_content_pairs} judged by the low-content rule); "
        f"largest hash bucket {g.candidates.largest_bucket}, {g.candidates.buckets_split} buckets split"
    )

    # --- operating points
    methods = list(dict.fromkeys(r.method for r in rows))
    best: dict[str, Row | None] = {}
    for mth in methods:
        ok = [r for r in rows if r.method == mth and r.precision >= TARGET_PRECISION and r.predicted > 0]
        best[mth] = max(ok, key=lambda r: (r.recall, -(r.threshold or 0))) if ok else None
    print(f"\n## Best recall at precision >= {TARGET_PRECISION}\n")
    print("| method | threshold | precision | recall |\n|---|---|---|---|")
    for mth, r in best.items():
        if r is None:
            print(f"| {mth} | none reaches it | - | - |")
        else:
            print(f"| {mth} | {_thr(r)} | {r.precision:.5f} | {r.recall:.4f} |")
    levels = (0.95, 0.97, 0.98, 0.99, 0.995)
    print("\nBest recall (threshold) at other precision floors:\n")
    print("| method | " + " | ".join(f"P >= {p}" for p in levels) + " |\n|---|" + "---|" * len(levels))
    for mth in methods:
        cells = []
        for p in levels:
            ok = [r for r in rows if r.method == mth and r.precision >= p and r.predicted > 0]
            r = max(ok, key=lambda r: (r.recall, -(r.threshold or 0))) if ok else None
            cells.append("-" if r is None else f"{r.recall:.4f} ({_thr(r)})")
        print(f"| {mth} | " + " | ".join(cells) + " |")

    # --- per transform at the operating points, plus Hamming distances
    is_copy = transform != "original"
    ours_ok = [r for r in rows if r.method.startswith("ours") and r.precision >= TARGET_PRECISION and r.predicted]
    best["ours"] = max(ours_ok, key=lambda r: (r.recall, -(r.threshold or 0))) if ours_ok else None
    best["ours: defaults"] = next(x for x in rows if x.method == default_method and x.threshold == DEFAULT.radius)
    shown = ("ours", "ours: defaults", "ours: hash only", "sha1 bytes", "phash crop32", "phash native")
    ops = [(m, best[m]) for m in shown if best.get(m) is not None]
    if best["ours"] is not None:
        print(
            f"\nours, best of every threshold at P >= {TARGET_PRECISION}: {best['ours'].method} @ radius "
            f"{best['ours'].threshold} (precision {best['ours'].precision:.5f}, recall {best['ours'].recall:.4f})"
        )
    print("\n## Per-transform recall at each operating point: share of (original, copy) pairs in one group\n")
    print("| transform | copies | " + " | ".join(f"{m} @ {_thr(r)}" for m, r in ops) + " |")
    print("|---|---|" + "---|" * len(ops))
    for t in TRANSFORMS:
        sel = np.flatnonzero(transform == t)
        cells = [f"{np.mean(r.groups[sel] == r.groups[family[sel]]):.3f}" for _, r in ops]
        print(f"| {t} | {len(sel)} | " + " | ".join(cells) + " |")
    print("\n## Per-source recall / precision at the operating points\n")
    print("| source | " + " | ".join(f"{m} @ {_thr(r)} (P / R)" for m, r in ops) + " |")
    print("|---|" + "---|" * len(ops))
    for s in counts:
        sel = source == s
        if not sel.any():
            continue
        cells = []
        for _, r in ops:
            p, h, tr = pair_scores(r.groups[sel], family[sel])
            cells.append(f"{(h / p if p else 1.0):.5f} / {(h / tr if tr else 1.0):.4f}")
        print(f"| {s} | " + " | ".join(cells) + " |")

    orig_idx = family[is_copy]
    d_ours = np.unpackbits(codes[is_copy] ^ codes[orig_idx], axis=1).sum(1)
    d_ph = np.bitwise_count(ph_crop[is_copy] ^ ph_crop[orig_idx]).astype(int)
    d_phn = np.bitwise_count(ph_native[is_copy] ^ ph_native[orig_idx]).astype(int)
    # distractor scale: nearest other-family neighbour of each original, per hash
    print("\n## Hamming distance original -> copy (median / 90th percentile / max)\n")
    print("| transform | ours (of 128) | phash crop32 (of 64) | phash native (of 64) |\n|---|---|---|---|")
    tcopy = transform[is_copy]
    for t in TRANSFORMS:
        sel = tcopy == t
        if sel.any():
            cells = [
                f"{int(np.median(d[sel]))} / {int(np.percentile(d[sel], 90))} / {int(d[sel].max())}"
                for d in (d_ours, d_ph, d_phn)
            ]
            print(f"| {t} | " + " | ".join(cells) + " |")
    fp_i, fp_j = brute_i[family[brute_i] != family[brute_j]], brute_j[family[brute_i] != family[brute_j]]
    fp_d = brute_d[family[brute_i] != family[brute_j]]
    print(
        "\nours: pairs of *different* originals by Hamming distance (the false-positive pool): "
        + ", ".join(f"<= {r}: {int((fp_d <= r).sum())}" for r in range(args.radii + 1))
    )

    # --- throughput
    big = np.resize(crops, (args.encode_items, 32, 32, 3))
    encode_bits(model, big[:8192])  # warm-up
    enc_s = median_time(lambda: encode_bits(model, big), 3)
    sub = np.resize(crops, (args.phash_items, 32, 32, 3))
    ph_s = median_time(lambda: [imagehash.phash(Image.fromarray(c)) for c in sub], 3)
    ours_rate, ph_rate = args.encode_items / enc_s, args.phash_items / ph_s

    def hash_and_verify() -> None:  # what the stage does per item, from decoded crops, at the defaults
        c = encode_bits(model, crops)
        th = thumbnails(crops)
        digests = [hashlib.sha1(x.tobytes()).digest() for x in crops]
        group_near_duplicates(c, th, radius=DEFAULT.radius, rule=DEFAULT.rule(), content=digests)

    full_rate = n / median_time(hash_and_verify, 3)
    print("\n## Hashing throughput from decoded 32x32 uint8 crops (median of 3)\n")
    print("| method | items | items/s |\n|---|---|---|")
    print(f"| ours: encode_bits (torch, {torch.get_num_threads()} threads) | {args.encode_items} | {ours_rate:,.0f} |")
    print(
        f"| ours: hash + thumbnails + content digest + grouping with verification (defaults) | {n} | {full_rate:,.0f} |"
    )
    print(f"| imagehash.phash on PIL image (1 process) | {args.phash_items} | {ph_rate:,.0f} |")
    print(f"| sha1 of file bytes (in-run, {n} items) | {n} | {n / sha_hash_s:,.0f} |")

    # --- goals (the near-duplicate issue's targets)
    bo = best["ours"]
    print("\n## Goals\n")
    per_t = (
        {t: float(np.mean(bo.groups[transform == t] == bo.groups[family[transform == t]])) for t in TRANSFORMS}
        if bo
        else {}
    )
    goals = [
        (
            f"recall >= 0.95 at precision >= {TARGET_PRECISION}",
            bo is not None and bo.recall >= 0.95,
            f"{bo.recall:.4f}" if bo else "-",
        ),
        (
            "brightness and contrast copies >= 0.98 each",
            bool(per_t) and min(per_t["brightness"], per_t["contrast"]) >= 0.98,
            f"{per_t.get('brightness', 0):.3f} / {per_t.get('contrast', 0):.3f}",
        ),
        (
            "jpeg, webp, png, rescale copies >= 0.99 each",
            bool(per_t) and min(per_t[t] for t in ("jpeg_low", "jpeg_high", "webp", "png", "rescale")) >= 0.99,
            ", ".join(f"{t} {per_t.get(t, 0):.3f}" for t in ("jpeg_low", "jpeg_high", "webp", "png", "rescale")),
        ),
        (f"hashing + verification >= {TARGET_RATE:,} items/s", full_rate >= TARGET_RATE, f"{full_rate:,.0f}"),
    ]
    for text, met, value in goals:
        print(f"- {text}: {'MET' if met else 'MISSED'} ({value})")
    print(f"- shift (reported, no target): {per_t.get('shift', 0):.3f}")

    if args.fp_sheet is not None and bo is not None:
        g = bo.groups
        pairs = [(i, j) for i, j in zip(fp_i.tolist(), fp_j.tolist(), strict=True) if g[i] == g[j]]
        rng = np.random.default_rng(args.seed)
        chosen = [pairs[k] for k in rng.permutation(len(pairs))[:48]]
        if chosen:
            tiles = [crops[k] for pair in chosen for k in pair]
            sheet = tile([cv2.resize(t, (64, 64), interpolation=cv2.INTER_NEAREST) for t in tiles], columns=12)
            cv2.imwrite(str(args.fp_sheet), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
            print(
                f"\n{len(chosen)} of {len(pairs)} direct false-positive pairs at radius {bo.threshold} "
                f"(side by side) -> {args.fp_sheet}"
            )
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s, load avg at end {os.getloadavg()[0]:.1f}")
    return 0


def _thr(row: Row) -> str:
    return "-" if row.threshold is None else str(row.threshold)


def _first_index(labels: np.ndarray) -> np.ndarray:
    """For each item, the smallest index with the same label."""
    first = np.full(labels.max() + 1 if len(labels) else 0, len(labels), np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


if __name__ == "__main__":
    raise SystemExit(main())
