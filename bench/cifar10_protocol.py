"""Benchmark: the paper's CIFAR-10 protocol (section 5.1) on DCGANs trained here, with baselines.

1. Data. Two training sets, each ingested like `dcgan-pipeline ingest --size 32` (min-resize +
   center crop, `run_photo_stage`) and sharded (`build_shards`) in a work folder of its own:
   Tiny-ImageNet train from `shared/data/tinyimagenet` (50,500 64x64 JPEGs of 202 classes, at
   32 px: the paper's cross-domain setting, D trained on ImageNet and tested on CIFAR-10) and
   CIFAR-10 train (50,000 32x32 JPEGs: the in-domain setting).
2. Training. One DCGAN per set with the paper's 32 px ImageNet discriminator (`imagenet32`: six
   3x3 convolutions of widths 128-512, 28,672 features) and the paper's hyper-parameters
   (batch 128, Adam 2e-4 / 0.5, uniform z), `--steps` steps each. A run that already reached
   `--steps` is reused, so a rerun only redoes the protocol.
3. Protocol. The trained D of each setting, the same architecture with random weights (seed
   12345, one baseline for both settings since they share the architecture) and raw pixels
   through the same pipeline: every conv layer max-pooled to 4x4 and concatenated, L2-SVM with
   C chosen on a 10% validation split of `--limit-train` CIFAR-10 training images (seeded
   subset), test accuracy on `--limit-test` test images (default: all 10,000).

    python bench/cifar10_protocol.py --steps 250 --limit-train 5000    # the CPU run in docs/benchmarks.md
    python bench/cifar10_protocol.py --quick                           # smoke run; its numbers mean nothing

Results go to WORK/results.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

from dcgan.checkpoint import list_checkpoints  # noqa: E402
from dcgan.evaluation.cifar import load_labelled_images, pixel_features, seeded, svm_protocol  # noqa: E402
from dcgan.evaluation.features import extract_features  # noqa: E402
from dcgan.evaluation.runs import load_run  # noqa: E402
from dcgan.train import TrainConfig, train  # noqa: E402
from preprocessing.images import DEFAULT_MAX_PIXELS  # noqa: E402
from preprocessing.photo_stages import ingest_settings, run_photo_stage  # noqa: E402
from preprocessing.sharding import build_shards  # noqa: E402

log = logging.getLogger("bench.cifar10_protocol")

SETTINGS = {
    "tinyimagenet32": SHARED / "data" / "tinyimagenet" / "train-50k.parquet",
    "cifar10_train": SHARED / "data" / "cifar10" / "train.parquet",
}
PAPER = {"DCGAN (ImageNet-1k D) + L2-SVM": 0.828, "1-layer K-means": 0.806, "3-layer K-means": 0.820}


def prepare_shards(name: str, source: Path, work: Path) -> Path:
    """Ingest at 32 px and shard, once; returns the shards folder."""
    shards = work / "shards"
    if not (shards / "index.json").exists():
        t0 = time.perf_counter()
        table = run_photo_stage(source, work, name, ingest_settings(32, DEFAULT_MAX_PIXELS), part_size=5000, workers=2)
        build_shards(work, maxcount=10_000)
        log.info("%s: %d rows ingested and sharded in %.0f s", name, table.num_rows, time.perf_counter() - t0)
    return shards


def train_setting(name: str, shards: Path, work: Path, steps: int) -> dict:
    """Train (or reuse) the imagenet32 DCGAN of one setting; returns its training figures."""
    run = work / "train" / "bench"
    done = list_checkpoints(run)
    if done and load_run(run)[3] >= steps:
        log.info("%s: reusing %s", name, done[-1])
        return json.loads((run / "bench_train.json").read_text())
    cfg = TrainConfig(
        shards=str(shards),
        run_dir=str(run),
        steps=steps,
        resolution=32,
        batch_size=128,
        discriminator="imagenet32",
        device="cpu",
        log_every=10,
        sample_every=steps,
        checkpoint_every=steps,
        best_images=0,
        tensorboard=False,
    )
    result = train(cfg, resume=bool(done))
    rates = [json.loads(line)["img_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    figures = {
        "steps": result["steps"],
        "dataset_images": result["images"],
        "seconds": result["seconds"],
        "img_per_s": statistics.median(rates),
        "final": result["final"],
        "run_dir": str(run),
    }
    (run / "bench_train.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dcgan-bench-cifar10"), help="work folder (reused)")
    ap.add_argument("--steps", type=int, default=250, help="training steps per setting (batch 128)")
    ap.add_argument("--limit-train", type=int, default=5000, help="CIFAR-10 training images for the SVM (of 50k)")
    ap.add_argument("--limit-test", type=int, default=None, help="CIFAR-10 test images (default: all 10,000)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 500/500 images; numbers mean nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.limit_train, args.limit_test = 3, 500, 500
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()

    trained = {}
    for name, source in SETTINGS.items():
        work = args.work / name
        shards = prepare_shards(name, source, work)
        trained[name] = train_setting(name, shards, work, args.steps)
        log.info("%s: %.1f img/s over %d steps", name, trained[name]["img_per_s"], trained[name]["steps"])

    cifar = SHARED / "data" / "cifar10"
    train_set = load_labelled_images(cifar / "train.parquet", args.limit_train)
    test_set = load_labelled_images(cifar / "test.parquet", args.limit_test)
    discriminators = {f"D trained on {name}": load_run(Path(t["run_dir"]))[2] for name, t in trained.items()}
    any_d = next(iter(discriminators.values()))
    discriminators["random D (same architecture)"] = seeded(copy.deepcopy(any_d), seed=12345)
    results = {}
    for label, D in discriminators.items():
        log.info("SVM on features of %s", label)
        results[label] = svm_protocol(train_set, test_set, lambda x, m=D: extract_features(m, x))
        log.info("%s: %.4f", label, results[label]["test_accuracy"])
    results["raw pixels"] = svm_protocol(train_set, test_set, pixel_features)

    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}",
        "command": " ".join(["python", "bench/cifar10_protocol.py", *(argv if argv is not None else sys.argv[1:])]),
        "training": trained,
        "protocol": results,
        "paper": PAPER,
        "total_seconds": time.perf_counter() - t_start,
    }
    (args.work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| features | test accuracy | dim | C | SVM train images | test images | seconds |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['test_accuracy'] * 100:.2f}% | {r['feature_dim']} | {r['C']:g} | {r['n_train']} | "
            f"{r['n_test']} | {r['total_seconds']:.0f} |"
        )
    print(f"\nresults: {args.work / 'results.json'} ({report['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
