"""Benchmark: a scale rehearsal of extract -> dedup -> shard on LSUN-format LMDBs of growing size.

1. Records. For each `--sizes` N an LMDB in the official LSUN layout is written with
   `preprocessing.lsun.write_lsun_lmdb` (40-hex keys). Record i is a random crop of a random
   shared photo (CelebA 178x218 and Tiny-ImageNet 64x64, read-only from ../shared; CIFAR-10 is
   too small for 64 px crops): scale 0.5-1.0 of the photo, random position, mirrored with
   probability 1/2, resized to a 96 px short side (CelebA crops shrink, Tiny-ImageNet crops of
   32-64 px grow), and encoded as JPEG (even i) or WebP (odd i) at quality 75-90, so records
   are distinct. The last `--dup-frac` of the N are
   planted near copies: an earlier record decoded and re-encoded as JPEG at a quality at least
   5 away from its own; the (original, copy) pairs are recorded. Records are generated one at a
   time, but `write_lsun_lmdb` lists its values, so all N encoded records are in memory while
   it writes (about 1 GB at 200k; this process is not measured).
2. Stages. For each size and each `--runners` entry, in a fresh work directory under
   `--scratch`, every step runs in its own child process (this script with a hidden --child),
   so that each step's peak memory is its own:
   extract `flows.lsun.lsun_extract_flow(db, work, LsunSettings(size=64, part_size=P), runner=R)`
   with R the default process pool (`runner=` is then not passed) or `RunnerSettings(type="dask",
   workers=--dask-workers)`; then `dedup.stage.collect_crops`, `prepare_autoencoder`,
   `encode_items`, `group_items` (DedupSettings(max_epochs=--ae-epochs)); then
   `preprocessing.sharding.build_shards`. The flow runs against one temporary Prefect API that
   this process starts (`prefect_test_harness`, as the tests' `prefect_api` fixture) and exports
   as PREFECT_API_URL to the children, or the PREFECT_API_URL you set; PREFECT_HOME (results,
   logs) defaults to a folder under --scratch, removed at the end.
3. Measures per step: seconds of the call alone (imports and API start-up excluded); items/s
   (items = records for extract, the collected ok items for dedup, shard samples for shard);
   peak RSS = the larger of the child's VmHWM and the peak, sampled every 0.25 s, of the summed
   RSS of the child and all its descendants (pool or Dask workers; pages shared between them
   count once per process, so this errs high); disk = bytes allocated under the work directory
   after the step. Planted pairs found = share of planted (original, copy) pairs whose two keys
   (the LMDB keys, which are the manifest keys) share a group in work/dedup/codes.parquet.

Printed per runner: a table of steps x sizes, the cost per item at the largest size over the
smallest (target <= 1.3), peak RSS at the largest size (target < 8 GB) and planted pairs found;
the dask/process throughput ratio when both ran (expected within 20%; only extract uses the
runner, so the other rows show the noise); and a projection to 3M records per step: seconds
from a power law a * N^b through the two largest sizes, RSS and disk linear through them.
Each size's work directories and LMDB are deleted once measured (unless --keep).

    python bench/scale.py                              # 20k, 50k, 200k records; process and dask
    python bench/scale.py --quick --runners process    # smoke run (2k, 4k); its numbers mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

# Run as `python bench/scale.py`, this file's folder comes first on sys.path: drop it so that
# `dedup` is the package, not bench/dedup.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.modules.pop("dedup", None)

from preprocessing.lsun import write_lsun_lmdb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))
PHOTO_TABLES = ("celeba/celeba-6k.parquet", "tinyimagenet/train-50k.parquet")
SHORT_SIDE = 96  # records' short side (LSUN's are 256: smaller keeps the rehearsal fast)
CROP = 64  # extraction size
STEPS = ("extract", "dedup: collect", "dedup: autoencoder", "dedup: encode", "dedup: group", "shard")
DEDUP_STEPS = STEPS[1:5]
ROWS = (*STEPS[:5], "dedup total", "shard")
PROJECT_TO = 3_000_000
COST_TARGET, RSS_TARGET_GB, RUNNER_SPREAD = 1.3, 8.0, 0.20
GB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE")
RESULT = "RESULT "


# ---------------------------------------------------------------------------- records and LMDBs


def load_photos(shared: Path) -> list[bytes]:
    """The encoded shared photos that crops are cut from (about 160 MB)."""
    photos: list[bytes] = []
    for name in PHOTO_TABLES:
        photos += pq.read_table(shared / "data" / name, columns=["image"])["image"].to_pylist()
    return photos


def encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """`image` (BGR) as JPEG ("jpg") or WebP ("webp") bytes, the two formats LSUN holds."""
    flag = cv2.IMWRITE_JPEG_QUALITY if fmt == "jpg" else cv2.IMWRITE_WEBP_QUALITY
    ok, buf = cv2.imencode(f".{fmt}", image, [flag, quality])
    assert ok
    return buf.tobytes()


def random_view(photo: bytes, rng: np.random.Generator) -> np.ndarray:
    """A random crop (0.5-1.0 of each side, random place), mirrored half the time, resized to a 96 px short side."""
    image = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    scale = rng.uniform(0.5, 1.0)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    view = image[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    f = SHORT_SIDE / min(ch, cw)
    interpolation = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(view, (max(1, round(cw * f)), max(1, round(ch * f))), interpolation=interpolation)


def near_copy(original: bytes, quality: int, rng: np.random.Generator) -> bytes:
    """The original decoded and re-encoded as JPEG at a quality at least 5 away from its own."""
    image = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_COLOR)
    choices = [q for q in range(60, 96) if abs(q - quality) >= 5]
    return encode(image, "jpg", int(rng.choice(choices)))


def records(n: int, photos: list[bytes], pairs: np.ndarray, rng: np.random.Generator) -> Iterator[bytes]:
    """Yield the n records: distinct views first, then one near copy per row of `pairs` (original, copy).

    Only the originals' bytes are kept until their copies are written.
    """
    originals = set(pairs[:, 0].tolist())
    kept: dict[int, tuple[bytes, int]] = {}
    base = n - len(pairs)
    for i in range(base):
        quality = int(rng.integers(75, 91))
        view = random_view(photos[int(rng.integers(len(photos)))], rng)
        value = encode(view, "jpg" if i % 2 == 0 else "webp", quality)
        if i in originals:
            kept[i] = (value, quality)
        yield value
    for original, _ in pairs:
        yield near_copy(*kept.pop(int(original)), rng)


def build_lmdb(db: Path, n: int, photos: list[bytes], dup_frac: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Write the LMDB of n records; returns its keys in record order and the planted (original, copy) indices."""
    rng = np.random.default_rng([seed, n])
    planted = round(dup_frac * n)
    base = n - planted
    pairs = np.stack([np.sort(rng.choice(base, planted, replace=False)), base + np.arange(planted)], axis=1)
    keys = write_lsun_lmdb(db, records(n, photos, pairs, rng))
    return keys, pairs


# ---------------------------------------------------------------------------- child: one step


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of `root` and all its descendants, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. of proc(5): the name may hold spaces
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class TreePeak:
    """Samples the process tree's RSS in a thread: VmHWM alone misses pool and Dask worker processes."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.peak = 0
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            self._stop.wait(self._every)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm_bytes() -> int:
    """This process's exact peak RSS (the sampler may miss a short spike)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def runner_kwargs(runner: str, dask_workers: int) -> dict[str, Any]:
    """`runner=` for the flow, passed only off the default process pool (so a flow without it still runs)."""
    if runner == "process":
        return {}
    from preprocessing.settings import RunnerSettings

    return {"runner": RunnerSettings(type="dask", workers=dask_workers)}


def run_step(job: dict[str, Any]) -> tuple[int, float]:
    """Run one step on the work directory; returns (items, seconds of the call alone)."""
    from dedup.settings import DedupSettings
    from dedup.stage import collect_crops, encode_items, group_items, load_crops, prepare_autoencoder
    from preprocessing.settings import LsunSettings
    from preprocessing.sharding import build_shards

    work, step = Path(job["work"]), job["step"]
    dedup = DedupSettings(max_epochs=job["ae_epochs"])
    if step == "extract":
        from flows.lsun import lsun_extract_flow

        settings = LsunSettings(size=CROP, part_size=job["part_size"])
        kwargs = runner_kwargs(job["runner"], job["dask_workers"])
        t0 = time.perf_counter()
        result = lsun_extract_flow(db=[job["db"]], work=str(work), settings=settings, **kwargs)
        return result[0]["total"], time.perf_counter() - t0
    t0 = time.perf_counter()
    if step == "dedup: collect":
        items = collect_crops(work)
    elif step == "dedup: autoencoder":
        items = prepare_autoencoder(work, dedup)[1]["items"]
    elif step == "dedup: encode":
        encode_items(work)
        items = len(load_crops(work))
    elif step == "dedup: group":
        items = group_items(work, dedup)["items"]
    else:
        items = build_shards(work)["total"]
    return items, time.perf_counter() - t0


def child(job_json: str) -> None:
    """Run one step and print its measures as one JSON line."""
    with TreePeak() as peak:
        items, seconds = run_step(json.loads(job_json))
    rss = max(peak.peak, vm_hwm_bytes())
    print(RESULT + json.dumps({"items": items, "seconds": seconds, "rss_gb": rss / GB}), flush=True)


# ---------------------------------------------------------------------------- parent: sizes x runners


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API for every child (each starting its own costs 5-20 s), unless one is set."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (offline defaults in the environment, before the server starts)

    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one step in a fresh process; on failure show its output and stop."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], cwd=ROOT, capture_output=True, text=True
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"step {job['step']} failed (exit {out.returncode}) in {job['work']}")
    return json.loads(lines[-1][len(RESULT) :])


def disk_gb(path: Path) -> float:
    """Bytes allocated under `path` (as du counts them)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total / GB


def planted_found(work: Path, keys: list[str], pairs: np.ndarray) -> float:
    """Share of planted (original, copy) pairs whose two items ended in one dedup group."""
    if not len(pairs):
        return float("nan")
    codes = pq.read_table(work / "dedup" / "codes.parquet", columns=["key", "group"])
    group = dict(zip(codes["key"].to_pylist(), codes["group"].to_pylist(), strict=True))
    hits = [group.get(keys[a], -1) == group.get(keys[b], -2) for a, b in pairs.tolist()]
    return float(np.mean(hits))


def bench_one(db: Path, work: Path, runner: str, keys: list[str], pairs: np.ndarray, args: argparse.Namespace) -> dict:
    """Every step of one size on one runner, each in its own child; rows keyed by ROWS plus `planted_found`."""
    rows: dict[str, Any] = {}
    for step in STEPS:
        job = {
            "step": step,
            "work": str(work),
            "db": str(db),
            "runner": runner,
            "dask_workers": args.dask_workers,
            "part_size": args.part_size,
            "ae_epochs": args.ae_epochs,
        }
        rows[step] = {**run_child(job), "disk_gb": disk_gb(work)}
        r = rows[step]
        print(
            f"  {runner} {len(keys):,} {step}: {r['seconds']:.1f} s, {r['items']:,} items, "
            f"{r['rss_gb']:.2f} GB RSS, {r['disk_gb']:.2f} GB on disk",
            flush=True,
        )
    dedup = [rows[s] for s in DEDUP_STEPS]
    rows["dedup total"] = {
        "items": dedup[0]["items"],
        "seconds": sum(r["seconds"] for r in dedup),
        "rss_gb": max(r["rss_gb"] for r in dedup),
        "disk_gb": dedup[-1]["disk_gb"],
    }
    rows["planted_found"] = planted_found(work, keys, pairs)
    return rows


# ---------------------------------------------------------------------------- report


def per_item(row: dict) -> float:
    return row["seconds"] / row["items"]


def cell(r: dict) -> str:
    return f"{r['items'] / r['seconds']:,.0f} | {r['seconds']:.1f} | {r['rss_gb']:.2f} | {r['disk_gb']:.2f}"


def print_runner_table(runner: str, sizes: list[int], res: dict[int, dict], planted: dict[int, int]) -> None:
    """Steps x sizes, then the growth of cost per item, RSS at the largest size and planted pairs found."""
    small, large = sizes[0], sizes[-1]
    head = " | ".join(f"{n:,}: items/s | s | RSS GB | disk GB" for n in sizes)
    print(f"\n### runner: {runner}\n")
    print(f"| step | {head} | cost/item {large:,} / {small:,} | peak RSS GB at {large:,} | planted pairs found |")
    print("|---|" + "---|" * (4 * len(sizes) + 3))
    for step in ROWS:
        cells = [cell(res[n][step]) for n in sizes]
        growth = per_item(res[large][step]) / per_item(res[small][step])
        found = res[large]["planted_found"] if step in ("dedup: group", "dedup total") else None
        found_cell = f"{found:.3f} of {planted[large]:,}" if found is not None else ""
        print(
            f"| {step} | {' | '.join(cells)} | {growth:.2f}{'' if growth <= COST_TARGET else ' (over)'} | "
            f"{res[large][step]['rss_gb']:.2f}{'' if res[large][step]['rss_gb'] < RSS_TARGET_GB else ' (over)'} | "
            f"{found_cell} |"
        )
    found = ", ".join(f"{n:,}: {res[n]['planted_found']:.3f} of {planted[n]:,}" for n in sizes)
    print(f"\nplanted pairs found per size: {found}")


def print_runner_ratio(sizes: list[int], results: dict[str, dict[int, dict]]) -> None:
    """Throughput dask / process per step and size (only extract runs on the runner)."""
    print("\n### throughput dask / process\n")
    print("| step | " + " | ".join(f"{n:,}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for step in ROWS:
        ratios = [per_item(results["process"][n][step]) / per_item(results["dask"][n][step]) for n in sizes]
        cells = [f"{x:.2f}{'' if abs(x - 1) <= RUNNER_SPREAD else ' (off)'}" for x in ratios]
        print(f"| {step} | {' | '.join(cells)} |")


def print_projection(runner: str, sizes: list[int], res: dict[int, dict]) -> None:
    """Each step at 3M records: seconds = a * N^b through the two largest sizes; RSS and disk linear."""
    n1, n2 = sizes[-2], sizes[-1]
    print(f"\n### runner {runner}: projected to {PROJECT_TO:,} records (fit through {n1:,} and {n2:,})\n")
    print("| step | b (seconds ~ N^b) | projected s | projected h | projected peak RSS GB | projected disk GB |")
    print("|---|---|---|---|---|---|")
    for step in ROWS:
        r1, r2 = res[n1][step], res[n2][step]
        b = math.log(r2["seconds"] / r1["seconds"]) / math.log(n2 / n1)
        seconds = r2["seconds"] * (PROJECT_TO / n2) ** b
        rss, disk = (r2[k] + (r2[k] - r1[k]) / (n2 - n1) * (PROJECT_TO - n2) for k in ("rss_gb", "disk_gb"))
        print(f"| {step} | {b:.2f} | {seconds:,.0f} | {seconds / 3600:.2f} | {rss:.2f} | {disk:.1f} |")


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,50000,200000", help="records per LMDB, ascending")
    ap.add_argument("--runners", default="process,dask", help="comma list of process,dask")
    ap.add_argument("--dask-workers", type=int, default=2, help="processes of the temporary local Dask cluster")
    ap.add_argument("--part-size", type=int, default=5000, help="records per extraction part")
    ap.add_argument("--ae-epochs", type=int, default=5, help="autoencoder epochs at most (DedupSettings.max_epochs)")
    ap.add_argument("--dup-frac", type=float, default=0.02, help="share of each LMDB that is planted near copies")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/scale_bench"), help="LMDBs and work directories")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (holding data/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep each size's LMDB and work directories")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 2000,4000, 1 epoch, parts of 500")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.ae_epochs, args.part_size = "2000,4000", 1, 500
    args.size_list = [int(s) for s in args.sizes.split(",")]
    args.runner_list = [r for r in args.runners.split(",") if r]
    if args.size_list != sorted(args.size_list) or len(args.size_list) < 2 or min(args.size_list) < 1:
        ap.error("--sizes needs two or more ascending positive sizes")
    if not args.runner_list or not set(args.runner_list) <= {"process", "dask"}:
        ap.error("--runners takes process and/or dask")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if "dask" in args.runner_list:
        runner_kwargs("dask", args.dask_workers)  # a bad setting fails now, not after the first size
    args.scratch.mkdir(parents=True, exist_ok=True)
    own_home = "PREFECT_HOME" not in os.environ  # results and logs of the flow runs, removed at the end
    os.environ.setdefault("PREFECT_HOME", str(args.scratch / "prefect-home"))
    sizes = args.size_list
    print(f"# Scale rehearsal: extract -> dedup -> shard ({date.today()}, {machine_line()})")
    print(f"command: python bench/scale.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"sizes {', '.join(f'{n:,}' for n in sizes)}; runners {', '.join(args.runner_list)} (dask: "
        f"{args.dask_workers} workers); extract {CROP} px, parts of {args.part_size}; autoencoder <= "
        f"{args.ae_epochs} epochs; {args.dup_frac:.1%} planted near copies; seed {args.seed}\n"
    )
    photos = load_photos(args.shared)
    results: dict[str, dict[int, dict]] = {r: {} for r in args.runner_list}
    planted: dict[int, int] = {}
    with prefect_api():
        for n in sizes:
            root = args.scratch / f"n{n}"
            db = root / "scale_train_lmdb"
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            keys, pairs = build_lmdb(db, n, photos, args.dup_frac, args.seed)
            planted[n] = len(pairs)
            print(
                f"LMDB of {n:,} records ({len(pairs):,} planted copies) built in {time.perf_counter() - t0:.0f} s, "
                f"{disk_gb(db):.2f} GB",
                flush=True,
            )
            for runner in args.runner_list:
                work = root / f"work-{runner}"
                results[runner][n] = bench_one(db, work, runner, keys, pairs, args)
                if not args.keep:
                    shutil.rmtree(work)
            if not args.keep:
                shutil.rmtree(root)
    if own_home and not args.keep:
        shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)
    for runner in args.runner_list:
        print_runner_table(runner, sizes, results[runner], planted)
    if set(args.runner_list) == {"process", "dask"}:
        print_runner_ratio(sizes, results)
    for runner in args.runner_list:
        print_projection(runner, sizes, results[runner])
    print(
        f"\nTargets: cost per item at {sizes[-1]:,} / {sizes[0]:,} <= {COST_TARGET}, "
        f"peak RSS < {RSS_TARGET_GB:.0f} GB, dask within {RUNNER_SPREAD:.0%} of process; "
        f"load avg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
