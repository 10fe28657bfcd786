"""Benchmark: `verify --data` against reading the same files once (`cat` to /dev/null), in one run.

Target (issue 20): on a work directory of several GB, `verify --data` takes at most 1.5x the
time of reading the files it checks once. The work directory is built once (skipped when it
exists): the 50,000 Tiny-ImageNet photos of ../shared ingested at 64 px under `--sources`
source names, then shards without dedup (about 1.35 GB per source: staging tars plus shards).
Each round times, alternately, `cat` of every file verify reads and `verify_work(data=True)`,
each from a cold page cache (`/proc/sys/vm/drop_caches`, needs root; without it the rounds
are warm and the script says so) and then again warm. Prints the best round of each and the
ratios.

    python bench/verify.py                         # builds /tmp/verify-bench (2 sources, ~2.7 GB)
    python bench/verify.py --sources 1 --rounds 2  # smaller
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.verify import verify_work  # noqa: E402
from preprocessing.photo_stages import run_photo_stage  # noqa: E402
from preprocessing.settings import IngestSettings, ShardSettings  # noqa: E402
from preprocessing.sharding import build_shards  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyimagenet" / "train-50k.parquet"


def build(work: Path, photos: Path, sources: int) -> None:
    for i in range(sources):
        name = f"tiny_{i}"
        if not (work / "extract" / name / "manifest.parquet").exists():
            t0 = time.perf_counter()
            run_photo_stage(photos, work, name, IngestSettings(size=64, part_size=5000))
            print(f"# ingested {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (work / "shards" / "index.json").exists():
        t0 = time.perf_counter()
        build_shards(work, ShardSettings(dedup=False, maxcount=5000))
        print(f"# sharded in {time.perf_counter() - t0:.0f} s", flush=True)


def files_read(work: Path) -> list[Path]:
    """What verify --data reads in full: the tars, the Parquet and JSON indexes."""
    kinds = ("*.tar", "*.parquet", "*.json")
    return sorted(p for k in kinds for p in work.rglob(k) if "locks" not in p.parts)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed_cat(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(files), 500):
        subprocess.run(["cat", *map(str, files[start : start + 500])], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def timed_verify(work: Path) -> float:
    t0 = time.perf_counter()
    found = verify_work(work, data=True)
    elapsed = time.perf_counter() - t0
    if found.problems:
        raise SystemExit(f"the bench directory is not whole: {found.problems[0].line()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/verify-bench"))
    parser.add_argument("--photos", type=Path, default=TINY)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    build(args.work, args.photos, args.sources)
    files = files_read(args.work)
    size = sum(p.stat().st_size for p in files)
    print(f"# {args.work}: {len(files)} files, {size / 1e9:.2f} GB")
    best: dict[str, float] = {}
    cold = drop_caches()
    for _ in range(args.rounds):
        for name, run in (("cat", lambda: timed_cat(files)), ("verify --data", lambda: timed_verify(args.work))):
            for state in ("cold", "warm") if cold else ("warm",):
                if state == "cold":
                    drop_caches()
                elapsed = run()
                key = f"{name} ({state})"
                best[key] = min(best.get(key, float("inf")), elapsed)
    if not cold:
        print("# page cache could not be dropped (not root): warm rounds only")
    for key, elapsed in best.items():
        print(f"{key:24s} {elapsed:7.2f} s  {size / 1e9 / elapsed:6.2f} GB/s")
    for state in ("cold", "warm") if cold else ("warm",):
        ratio = best[f"verify --data ({state})"] / best[f"cat ({state})"]
        print(f"ratio verify/cat ({state}): {ratio:.2f}x" + ("  (target <= 1.5x)" if state == "cold" else ""))


if __name__ == "__main__":
    main()
