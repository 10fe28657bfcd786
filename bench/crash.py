"""Crash anywhere: kill the pipeline with SIGKILL at random moments, rerun it, and compare with an uninterrupted run.

A child process runs the demo-sized pipeline through the stage functions (no Prefect): the
first batch (LSUN extraction of a demo LMDB -> dedup -> shards -> a short training, resumed
when it finds its run) or the second, growing batch (20% more records: incremental extraction,
dedup and a new shard version). Each trial starts the child on a fresh copy of the state before
its batch, kills its whole process group at a moment drawn uniformly over the batch's measured
duration, reruns the child to completion, and compares the work directory with the
uninterrupted run's:

- every staging and shard tar, every checkpoint: the same bytes;
- every Parquet file (manifests, input index, dedup files, samples): the same rows; the part
  manifests' recorded tar checksums too;
- plan.json, index.json, checkpoints/sha256.json: the same; versions.json: the same but for times;
- the autoencoder: the same weights; `verify --data`: whole.

Timing files (metrics, summaries) and reports with their figures (they describe the last run:
a rerun that finds nothing new says so) are not compared. Prints the kills per stage (the
stage the child had started when it was killed) and every difference found.

    python bench/crash.py --trials 200            # the issue's run (about 40 minutes on 2 cores)
    python bench/crash.py --trials 6 --records 300 --steps 8   # the slow test's size
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("extract", "dedup", "shard", "train")
VOLATILE = {"metrics.jsonl", "quality.jsonl", "result.json", "summary.json", "report.md", "best.json"}


def child(args: argparse.Namespace) -> None:
    """One batch of the pipeline, resuming whatever an earlier, killed run left."""
    from dcgan.train import TrainConfig, train
    from dedup.settings import DedupSettings
    from dedup.stage import collect_crops, encode_items, group_items, prepare_autoencoder
    from preprocessing.lsun import extract_lsun
    from preprocessing.settings import LsunSettings, ShardSettings
    from preprocessing.sharding import build_shards

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    work, db = Path(args.work), Path(args.db)

    def stage(name: str) -> None:
        print(f"stage {name}", flush=True)

    stage("extract")
    extract_lsun(db, work, LsunSettings(size=32, part_size=max(50, args.records // 6)), name="demo", workers=2)
    stage("dedup")
    settings = DedupSettings(max_epochs=2)
    collect_crops(work)
    checkpoint, _ = prepare_autoencoder(work, settings)
    encode_items(work, checkpoint)
    group_items(work, settings)
    stage("shard")
    build_shards(work, ShardSettings(maxcount=max(50, args.records // 4)))
    if args.phase == "first":
        stage("train")
        run = work / "train" / "run"
        cfg = TrainConfig(
            shards=str(work / "shards"),
            run_dir=str(run),
            resolution=32,
            steps=args.steps,
            batch_size=32,
            ngf=16,
            ndf=16,
            checkpoint_every=2,
            log_every=2,
            sample_every=1000,
            best_images=0,
            tensorboard=False,
            device="cpu",
        )
        train(cfg, resume=(run / "checkpoints").exists(), progress=False)
    stage("done")


def _child_cmd(args: argparse.Namespace, work: Path, db: Path, phase: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--work",
        str(work),
        "--db",
        str(db),
        "--phase",
        phase,
        "--records",
        str(args.records),
        "--steps",
        str(args.steps),
    ]


def run_child(cmd: list[str], log: Path, kill_after: float | None = None) -> str | None:
    """Run the child; with `kill_after`, SIGKILL its process group then; returns the stage it was in."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stages = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("stage ")]
            return stages[-1] if stages else "startup"
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return None


def differences(ref: Path, got: Path) -> list[str]:
    """What differs between two work directories, in the ways that matter (see the module docstring)."""
    import pyarrow.parquet as pq
    import torch

    from flows.verify import verify_work

    diffs = []

    def names(root: Path) -> set[Path]:
        skip = {"locks", "samples"}  # lock files; training's sample grids
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and not skip & set(p.parts)}

    want, have = names(ref), names(got)
    for rel in sorted(want ^ have):
        if rel.name not in VOLATILE and rel.suffix != ".png" and not rel.name.startswith("."):
            diffs.append(f"{rel}: only in {'the reference' if rel in want else 'the crashed run'}")
    for rel in sorted(want & have):
        a, b = ref / rel, got / rel
        if rel.name in VOLATILE or rel.suffix in (".png", ".npy"):
            continue  # timings; figures; .npy caches are checked through the files derived from them
        if rel.suffix in (".tar", ".mdb") or rel.parent.name == "checkpoints":
            same = a.read_bytes() == b.read_bytes()
        elif rel.suffix == ".parquet":
            ta, tb = pq.read_table(a), pq.read_table(b)
            same = ta.replace_schema_metadata(None).equals(tb.replace_schema_metadata(None))
            meta = lambda t: (t.schema.metadata or {}).get(b"tar_sha256")  # noqa: E731
            same = same and meta(ta) == meta(tb)
        elif rel.name == "versions.json":
            strip = lambda p: [{k: v for k, v in e.items() if k != "time"} for e in json.loads(p.read_text())]  # noqa: E731
            same = strip(a) == strip(b)
        elif rel.suffix == ".json":
            same = json.loads(a.read_text()) == json.loads(b.read_text())
        elif rel.name == "autoencoder.pt":
            sa, sb = (torch.load(p, weights_only=True)["state"] for p in (a, b))
            same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            diffs.append(f"{rel}: differs")
    found = verify_work(got, data=True)
    diffs += [f"verify: {p.line()}" for p in found.problems]
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--records", type=int, default=3000, help="demo LMDB records of the first batch (the demo's)")
    parser.add_argument("--steps", type=int, default=12, help="training steps of the first batch")
    parser.add_argument("--root", type=Path, default=Path("/tmp/crash-bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--db", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="first", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from preprocessing.demo_data import build_demo_lmdb

    root = args.root
    shutil.rmtree(root, ignore_errors=True)
    work, db = root / "run" / "work", root / "run" / "sources" / "demo_train_lmdb"
    lmdbs = {}
    for phase, records in (("first", args.records), ("grow", args.records + args.records // 5)):
        build_demo_lmdb(root / phase / "demo_train_lmdb", records)
        lmdbs[phase] = root / phase / "demo_train_lmdb"

    def fresh(phase: str) -> None:
        shutil.rmtree(root / "run", ignore_errors=True)
        shutil.copytree(lmdbs[phase], db)
        if phase == "grow":
            shutil.copytree(root / "ref-first", work)

    durations, refs = {}, {}
    for phase in ("first", "grow"):  # the uninterrupted runs, at the same paths as the trials
        fresh(phase)
        t0 = time.perf_counter()
        run_child(_child_cmd(args, work, db, phase), root / "log.txt")
        durations[phase] = time.perf_counter() - t0
        refs[phase] = root / f"ref-{phase}"
        shutil.copytree(work, refs[phase])
        print(f"# uninterrupted {phase} batch: {durations[phase]:.1f} s", flush=True)
    rng = random.Random(args.seed)
    kills: Counter = Counter()
    found: list[str] = []
    t_start = time.perf_counter()
    for trial in range(args.trials):
        phase = "first" if trial % 3 != 2 else "grow"  # a third of the kills hit the growing batch
        fresh(phase)
        at = rng.uniform(0, durations[phase])
        stage = run_child(_child_cmd(args, work, db, phase), root / "log.txt", kill_after=at)
        kills[f"{phase}/{stage or 'finished'}"] += 1
        run_child(_child_cmd(args, work, db, phase), root / "log.txt")  # the rerun, to completion
        diffs = differences(refs[phase], work)
        found += [f"trial {trial} ({phase}, killed at {at:.1f} s in {stage}): {d}" for d in diffs]
        print(
            f"trial {trial:3d}: {phase:5s} killed at {at:5.1f} s in {stage or 'finished'}: {len(diffs)} differences",
            flush=True,
        )
    print(f"\n{args.trials} trials in {(time.perf_counter() - t_start) / 60:.1f} min; kills per stage:")
    for key, n in sorted(kills.items()):
        print(f"  {key:20s} {n}")
    print(f"differences: {len(found)}")
    for line in found:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps({"trials": args.trials, "kills": kills, "differences": found}, indent=2))
    if found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
