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
4. Solvers. On the same features, the protocol runs with the solver of dcgan.evaluation.svm
   (Newton-CG, adaptive C grid, bfloat16 Hessian products where faster, C scored at liblinear's
   tolerance) and with a baseline: `--baseline lbfgs` (default), the first solver (full-batch
   L-BFGS over C = 1e-4 ... 1, kept below as `baseline_select_and_fit`), or `--baseline
   newton-fp32`, the Newton-CG solver as it was before bfloat16 (float32 products, rank-512
   preconditioner, every C solved to the final tolerance); `--no-baseline` skips it. The table
   gives both wall times, their ratio and both accuracies. `--precision` (auto, fp32, bf16)
   sets the D features' and the new solver's precision; the features' time is reported.

    python bench/cifar10_protocol.py --steps 250 --limit-train 5000    # the CPU run in docs/benchmarks.md
    python bench/cifar10_protocol.py --settings none --limit-train 50000 --no-baseline   # full size, random D
    python bench/cifar10_protocol.py --settings none --limit-train 10000 --baseline newton-fp32  # vs the fp32 solver
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

from dcgan.checkpoint import list_checkpoints  # noqa: E402
from dcgan.evaluation.cifar import load_labelled_images, pixel_features, seeded  # noqa: E402
from dcgan.evaluation.features import extract_features  # noqa: E402
from dcgan.evaluation.runs import load_run  # noqa: E402
from dcgan.evaluation.svm import TOL, LinearSVM, select_and_fit  # noqa: E402
from dcgan.models import ImageNetDiscriminator32  # noqa: E402
from dcgan.precision import PRECISIONS  # noqa: E402

log = logging.getLogger("bench.cifar10_protocol")

SETTINGS = {
    "tinyimagenet32": SHARED / "data" / "tinyimagenet" / "train-50k.parquet",
    "cifar10_train": SHARED / "data" / "cifar10" / "train.parquet",
}
BASELINE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PAPER = {"DCGAN (ImageNet-1k D) + L2-SVM": 0.828, "1-layer K-means": 0.806, "3-layer K-means": 0.820}


def prepare_shards(name: str, source: Path, work: Path) -> Path:
    """Ingest at 32 px and shard, once; returns the shards folder."""
    from preprocessing.photo_stages import run_photo_stage  # the training stack loads only when a D is trained
    from preprocessing.settings import IngestSettings, ShardSettings
    from preprocessing.sharding import build_shards

    shards = work / "shards"
    if not (shards / "index.json").exists():
        t0 = time.perf_counter()
        table = run_photo_stage(source, work, name, IngestSettings(size=32, part_size=5000), workers=2)
        build_shards(work, ShardSettings(maxcount=10_000))
        log.info("%s: %d rows ingested and sharded in %.0f s", name, table.num_rows, time.perf_counter() - t0)
    return shards


def train_setting(name: str, shards: Path, work: Path, steps: int) -> dict:
    """Train (or reuse) the imagenet32 DCGAN of one setting; returns its training figures."""
    from dcgan.train import TrainConfig, train

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


def _baseline_fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 500) -> LinearSVM:
    """The solver this benchmark compares against, as it was: full-batch L-BFGS on the scaled primal."""
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    xs = torch.from_numpy(np.asarray(x, np.float32))
    mean, scale = xs.mean(0), xs.std(0).clamp_min(1e-6)
    for i in range(0, len(xs), 8192):
        xs[i : i + 8192] = (xs[i : i + 8192] - mean) / scale
    n, f = xs.shape
    targets = -torch.ones(n, len(classes))
    targets[torch.arange(n), torch.from_numpy(yi)] = 1.0
    w = torch.zeros(f, len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = (1 - targets * (xs @ w + b)).clamp_min(0)
        loss = 0.5 * (w * w).sum() / (C * n) + (margin * margin).sum() / n
        loss.backward()
        return loss

    opt.step(closure)
    return LinearSVM(w.detach(), b.detach(), mean, scale, classes, C)


def baseline_select_and_fit(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[LinearSVM, dict[float, float]]:
    """The replaced selection: every C of BASELINE_GRID from scratch on the 90% split, then a refit."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(len(x) * 0.1))
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])
    scores = {}
    for C in BASELINE_GRID:
        scores[C] = _baseline_fit(x[fit], y[fit], C).accuracy(x[val], y[val])
        log.info("baseline L2-SVM C=%g: validation accuracy %.4f", C, scores[C])
    best = max(BASELINE_GRID, key=lambda c: (scores[c], -c))
    return _baseline_fit(x, y, best), scores


def fp32_newton_select_and_fit(x: np.ndarray, y: np.ndarray, label: str) -> tuple[LinearSVM, dict[float, float]]:
    """The Newton-CG solver before bfloat16: float32 products, rank 512, every C solved to TOL."""
    return select_and_fit(x, y, precision="fp32", rank=512, select_tol=TOL, desc=f"fp32 L2-SVM on {label}")


def compare_solvers(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    baseline: str,
    precision: str,
    label: str,
) -> dict:
    """Both solvers' protocol (C selection + refit + test) on the same features, timed in this process."""
    out = {}
    solvers = {"new": lambda: select_and_fit(x_train, y_train, precision=precision, desc=f"L2-SVM on {label}")}
    if baseline == "lbfgs":
        solvers["baseline"] = lambda: baseline_select_and_fit(x_train, y_train)
    elif baseline == "newton-fp32":
        solvers["baseline"] = lambda: fp32_newton_select_and_fit(x_train, y_train, label)
    for name, solve in solvers.items():
        t0 = time.perf_counter()
        model, scores = solve()
        accuracy = model.accuracy(x_test, y_test)
        out[name] = {
            "test_accuracy": accuracy,
            "C": model.C,
            "c_grid_end": model.grid_end,
            "validation_accuracy": {str(k): v for k, v in sorted(scores.items())},
            "seconds": time.perf_counter() - t0,
        }
        log.info("%s, %s solver: accuracy %.4f, C=%g, %.0f s", label, name, accuracy, model.C, out[name]["seconds"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dcgan-bench-cifar10"), help="work folder (reused)")
    ap.add_argument("--steps", type=int, default=250, help="training steps per setting (batch 128)")
    ap.add_argument("--limit-train", type=int, default=5000, help="CIFAR-10 training images for the SVM (of 50k)")
    ap.add_argument("--limit-test", type=int, default=None, help="CIFAR-10 test images (default: all 10,000)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="training sets to train a D on, or 'none'")
    ap.add_argument("--features", default="all", choices=["all", "pixels"], help="feature sets (pixels: quick)")
    ap.add_argument(
        "--baseline",
        default="lbfgs",
        choices=["lbfgs", "newton-fp32", "none"],
        help="the solver to compare with: the first one (L-BFGS; an hour at 50k) or Newton-CG in float32",
    )
    ap.add_argument("--no-baseline", action="store_true", help="same as --baseline none")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="features and new solver")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 500/500 images; numbers mean nothing")
    args = ap.parse_args(argv)
    if args.no_baseline:
        args.baseline = "none"
    if args.quick:
        args.steps, args.limit_train, args.limit_test = 3, 500, 500
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    names = [] if args.settings == "none" else args.settings.split(",")

    trained = {}
    for name in names:
        work = args.work / name
        shards = prepare_shards(name, SETTINGS[name], work)
        trained[name] = train_setting(name, shards, work, args.steps)
        log.info("%s: %.1f img/s over %d steps", name, trained[name]["img_per_s"], trained[name]["steps"])

    cifar = SHARED / "data" / "cifar10"
    t0 = time.perf_counter()
    train_set = load_labelled_images(cifar / "train.parquet", args.limit_train)
    test_set = load_labelled_images(cifar / "test.parquet", args.limit_test)
    decode_seconds = time.perf_counter() - t0
    discriminators = {f"D trained on {name}": load_run(Path(t["run_dir"]))[2] for name, t in trained.items()}
    any_d = next(iter(discriminators.values())) if discriminators else ImageNetDiscriminator32()
    discriminators["random D (same architecture)"] = seeded(copy.deepcopy(any_d), seed=12345)
    if args.features == "pixels":
        discriminators = {}
    feature_sets = {
        label: (lambda x, what, m=D: extract_features(m, x, progress=what, precision=args.precision))
        for label, D in discriminators.items()
    }
    feature_sets["raw pixels"] = pixel_features
    results = {}
    for label, features in feature_sets.items():
        t0 = time.perf_counter()
        x_train = features(train_set[0], f"{label}: {len(train_set[0])} training images")
        x_test = features(test_set[0], f"{label}: {len(test_set[0])} test images")
        feature_seconds = time.perf_counter() - t0
        results[label] = compare_solvers(
            x_train, train_set[1], x_test, test_set[1], baseline=args.baseline, precision=args.precision, label=label
        )
        results[label].update(feature_dim=int(x_train.shape[1]), feature_seconds=feature_seconds)
        del x_train, x_test

    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, load average at the end {os.getloadavg()[0]:.1f}",
        "command": " ".join(["python", "bench/cifar10_protocol.py", *(argv if argv is not None else sys.argv[1:])]),
        "training": trained,
        "n_train": len(train_set[1]),
        "n_test": len(test_set[1]),
        "decode_seconds": decode_seconds,
        "protocol": results,
        "paper": PAPER,
        "total_seconds": time.perf_counter() - t_start,
    }
    (args.work).mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nCIFAR-10 protocol, {report['n_train']} SVM training images, {report['n_test']} test images")
    print(
        "| features | dim | feature s | new: accuracy | C | grid end | SVM s | baseline: accuracy | C | SVM s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        new, old = r["new"], r.get("baseline")
        tail = (
            f"{old['test_accuracy'] * 100:.2f}% | {old['C']:g} | {old['seconds']:.0f} | "
            f"{old['seconds'] / new['seconds']:.1f}x"
            if old
            else "- | - | - | -"
        )
        print(
            f"| {label} | {r['feature_dim']} | {r['feature_seconds']:.0f} | {new['test_accuracy'] * 100:.2f}% | "
            f"{new['C']:g} | {new['c_grid_end'] or '-'} | {new['seconds']:.0f} | {tail} |"
        )
    protocol = decode_seconds + sum(r["feature_seconds"] + r["new"]["seconds"] for r in results.values())
    print(f"\nprotocol wall time with the new solver (decode + features + SVMs): {protocol / 60:.1f} min")
    if args.baseline != "none":
        old = decode_seconds + sum(r["feature_seconds"] + r["baseline"]["seconds"] for r in results.values())
        print(f"protocol wall time with the baseline solver: {old / 60:.1f} min ({old / protocol:.1f}x)")
    print(f"results: {args.work / 'results.json'} ({report['total_seconds'] / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
