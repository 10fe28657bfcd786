"""Benchmark: our LSUN extraction against the textbook torchvision LSUN loader, in one run.

Builds two LMDBs in the official LSUN layout from CelebA photos upscaled to about 256 px
on the short side (the size of LSUN's released images): one with JPEG values (quality 90)
and one with WebP values (quality 80). Then, on the same data and the same cores, it times

* ours: `preprocessing.lsun.extract_lsun(db, fresh_work_dir, LsunSettings(size=S, part_size=P), workers=W)`,
  the whole call: planning, a process pool of W workers (forked: this script is
  single-threaded), decode + center crop + antialiased resize + PPM sample + tar write +
  Parquet part manifests, and the merge;
* textbook: `torchvision.datasets.LSUN(root, classes=["bedroom_train"],
  transform=Compose([Resize(size), CenterCrop(size), ToTensor()]))` iterated fully through
  `DataLoader(batch_size=128, num_workers=W)`, the loader of the PyTorch DCGAN example.
  Construction of the dataset is inside the timed region (as our planning is); its key cache
  `_cache_<letters>` is written into a temp working directory by one untimed warm-up
  construction, so timed runs take the cache fast path.

Each method runs `--repeats` times per format with the order alternating between runs;
the report uses the median (and shows the best). Ratios, not absolute speeds, are the claim:
both sides share the machine, so background load hits both.

    python bench/lsun_extract.py                 # full: 3000 images, 3 repeats, 64 px
    python bench/lsun_extract.py --quick         # smoke run: 300 images, 1 repeat

torch/torchvision are imported lazily inside the textbook timing function, so that a spawn
pool (used when the caller has threads) would not charge our workers with a torch import.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from preprocessing.lsun import extract_lsun, write_lsun_lmdb
from preprocessing.settings import LsunSettings

DEFAULT_CELEBA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba" / "celeba-6k.parquet"
CATEGORY = "bedroom_train"  # torchvision's LSUN only accepts real category names: <root>/bedroom_train_lmdb
FORMATS = ("jpeg", "webp")


def _encode_pair(args: tuple[bytes, int, int, int, int]) -> tuple[bytes, bytes]:
    data, width, height, jpeg_q, webp_q = args
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    jpg, wbp = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG", quality=jpeg_q)
    img.save(wbp, "WEBP", quality=webp_q)
    return jpg.getvalue(), wbp.getvalue()


def build_lmdbs(root: Path, celeba: Path, n: int, short_side: int, workers: int) -> dict[str, dict[str, Path]]:
    """Write root/<method>/<fmt>/bedroom_train_lmdb from the first n CelebA photos (cycled if n > 6000).

    Each method gets its own byte-identical copy (same keys, same values): `extract_lsun` keeps its
    read-only environment open in the calling process, and lmdb refuses to open a path twice.
    """
    photos = pq.read_table(celeba, columns=["image"]).column("image").to_pylist()
    photos = [photos[i % len(photos)] for i in range(n)]
    w0, h0 = Image.open(io.BytesIO(photos[0])).size
    width, height = short_side, round(h0 * short_side / w0)  # CelebA 178x218 -> 256x314
    jobs = [(p, width, height, 90, 80) for p in photos]
    with ProcessPoolExecutor(workers) as pool:
        pairs = list(pool.map(_encode_pair, jobs, chunksize=64))
    dbs: dict[str, dict[str, Path]] = {"ours": {}, "textbook": {}}
    for i, fmt in enumerate(FORMATS):
        values = [pair[i] for pair in pairs]
        keys = None
        for method in dbs:
            db = root / method / fmt / f"{CATEGORY}_lmdb"
            keys = write_lsun_lmdb(db, values, keys)
            dbs[method][fmt] = db
        mean_kb = sum(map(len, values)) / len(values) / 1024
        print(
            f"built {root}/{{ours,textbook}}/{fmt}/{CATEGORY}_lmdb: {n} x {width}x{height} {fmt}, "
            f"mean {mean_kb:.1f} KiB",
            flush=True,
        )
    return dbs


def time_ours(db: Path, scratch: Path, size: int, workers: int, part_size: int, n: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="ours-", dir=scratch))
    try:
        t0 = time.perf_counter()
        table = extract_lsun(db, work, LsunSettings(size=size, part_size=part_size), workers=workers)
        dt = time.perf_counter() - t0
        ok = sum(s == "ok" for s in table.column("status").to_pylist())
        if table.num_rows != n or ok != n:
            raise RuntimeError(f"ours: {table.num_rows} rows, {ok} ok, expected {n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dt


def _textbook_dataset(root: Path, size: int):  # noqa: ANN202 - torchvision type imported lazily
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    return datasets.LSUN(str(root), classes=[CATEGORY], transform=tf)


def _close(ds) -> None:  # noqa: ANN001
    """Close the dataset's LMDB environments: lmdb refuses to open one path twice in a process."""
    for sub in ds.dbs:
        sub.env.close()


def time_textbook(root: Path, cache_dir: Path, size: int, workers: int, n: int) -> float:
    from torch.utils.data import DataLoader

    cwd = os.getcwd()
    os.chdir(cache_dir)  # LSUNClass writes/reads its key cache `_cache_<letters>` in the cwd
    try:
        t0 = time.perf_counter()
        ds = _textbook_dataset(root, size)
        loader = DataLoader(ds, batch_size=128, num_workers=workers)
        seen = 0
        for x, _ in loader:
            seen += x.shape[0]
        dt = time.perf_counter() - t0
        del loader
        _close(ds)
    finally:
        os.chdir(cwd)
    if seen != n or tuple(x.shape[1:]) != (3, size, size):
        raise RuntimeError(f"textbook: {seen} images of shape {tuple(x.shape[1:])}, expected {n} x (3,{size},{size})")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000, help="images per LMDB (default 3000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and format (default 3)")
    ap.add_argument("--size", type=int, default=64, help="output crop size (default 64)")
    ap.add_argument("--short-side", type=int, default=256, help="short side of the stored photos (default 256)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for both methods")
    ap.add_argument("--parts-per-worker", type=int, default=4, help="sets part_size = ceil(N / (W * this))")
    ap.add_argument("--celeba", type=Path, default=DEFAULT_CELEBA, help="CelebA parquet with an `image` column")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma list of jpeg,webp")
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temp dir (default: system temp)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 images, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 300, 1
    formats = [f for f in args.formats.split(",") if f]
    if not set(formats) <= set(FORMATS) or args.images < 1 or args.repeats < 1:
        ap.error("bad --formats, --images or --repeats")
    w = args.workers
    part_size = max(1, math.ceil(args.images / (w * args.parts_per_worker)))
    n_parts = math.ceil(args.images / part_size)

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; "
        f"N={args.images}, size={args.size}, workers={w}, part_size={part_size} ({n_parts} parts), "
        f"repeats={args.repeats}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="lsun-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        dbs = build_lmdbs(tmp / "data", args.celeba, args.images, args.short_side, w)
        print(f"data built in {time.perf_counter() - t0:.1f}s (untimed)", flush=True)
        cache_dir = tmp / "cwd"
        cache_dir.mkdir()
        scratch = tmp / "runs"
        scratch.mkdir()
        # Untimed warm-up: writes torchvision's key caches and imports torch in this process.
        cwd = os.getcwd()
        os.chdir(cache_dir)
        try:
            for fmt in formats:
                _close(_textbook_dataset(dbs["textbook"][fmt].parent, args.size))
        finally:
            os.chdir(cwd)

        times: dict[tuple[str, str], list[float]] = {(f, m): [] for f in formats for m in ("ours", "textbook")}
        run = 0
        for rep in range(args.repeats):
            for fmt in formats:
                order = ("ours", "textbook") if run % 2 == 0 else ("textbook", "ours")
                run += 1
                for method in order:
                    if method == "ours":
                        dt = time_ours(dbs["ours"][fmt], scratch, args.size, w, part_size, args.images)
                    else:
                        dt = time_textbook(dbs["textbook"][fmt].parent, cache_dir, args.size, w, args.images)
                    times[(fmt, method)].append(dt)
                    print(
                        f"  rep {rep + 1} {fmt:4s} {method:8s} {dt:6.2f}s  {args.images / dt:7.0f} img/s"
                        f"  (load avg {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        "| format | ours img/s, median (best) | textbook img/s, median (best) | ours/textbook, ratio of medians "
        "| paired ratio per repeat |"
    )
    print("|---|---|---|---|---|")
    for fmt in formats:
        ours, tb = times[(fmt, "ours")], times[(fmt, "textbook")]
        o_med, o_best = args.images / statistics.median(ours), args.images / min(ours)
        t_med, t_best = args.images / statistics.median(tb), args.images / min(tb)
        paired = ", ".join(f"{t / o:.2f}" for o, t in zip(ours, tb, strict=True))
        print(
            f"| {fmt.upper()} | {o_med:.0f} ({o_best:.0f}) | {t_med:.0f} ({t_best:.0f}) "
            f"| **{o_med / t_med:.2f}x** | {paired} |"
        )
    print(
        f"\n(N={args.images} images at {args.short_side}px short side -> {args.size}px, workers={w}, "
        f"part_size={part_size}, {args.repeats} repeats; "
        f"load avg at end {os.getloadavg()[0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
