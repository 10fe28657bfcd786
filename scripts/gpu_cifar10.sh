#!/usr/bin/env bash
# The GPU check of issue 14 in one device call (about 9 minutes on an H200): a DCGAN with the
# paper's 32 px ImageNet D (imagenet32, 28,672 features) trained on CIFAR-10 train at 32 px for
# GPU_CIFAR10_TRAIN_S seconds (360) with the project's fast step (Trainer's CUDA options, the
# cache gathered on the GPU), then the full CIFAR-10 protocol on the GPU: features of all 60,000
# images for the trained D, a random D (seed 12345) and raw pixels, C chosen on the 10%
# validation split, test on the 10,000 test images. Under $OUT (at most 8 files come back):
# table.md (accuracies, C, epochs, wall times), results.json, run.log, nvidia-smi.txt.
#
#   here, once:   bash scripts/gpu_cifar10.sh prepare   # CIFAR-10 tables + wheels into gpu_cifar10 (ignored, ~20 MB)
#   device tool:  run(command="bash scripts/gpu_cifar10.sh run", carry=["gpu_cifar10"], timeout_s=600)
#   CPU smoke:    GPU_CIFAR10_DEVICE=cpu bash scripts/gpu_cifar10.sh run   (tiny sizes: checks the script, not speed)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=gpu_cifar10
SHARED=${DCGAN_SHARED:-../shared}

case "${1:-}" in
prepare)
    mkdir -p "$DATA/wheels" "$DATA/tables"
    cp "$SHARED/data/cifar10/train.parquet" "$SHARED/data/cifar10/test.parquet" "$DATA/tables/"
    # what the device image lacks travels as wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DATA/wheels" -r scripts/device-wheels.txt
    du -sh "$DATA"
    ;;
run)
    OUT=${OUT:-$DATA/out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    DEVICE=${GPU_CIFAR10_DEVICE:-cuda}
    if [ "$DEVICE" = cuda ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site "$DATA"/wheels/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
        nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
        export TRAIN_S=${GPU_CIFAR10_TRAIN_S:-360} LIMIT_TRAIN="" LIMIT_TEST="" DISCRIMINATOR=imagenet32 BATCH=128
    else  # the smoke run uses this machine's environment
        export PYTHONPATH="$PWD"
        export TRAIN_S=${GPU_CIFAR10_TRAIN_S:-10} LIMIT_TRAIN=400 LIMIT_TEST=200 DISCRIMINATOR=dcgan BATCH=16
    fi
    export DEVICE DATA OUT
    python3 - <<'EOF' 2>&1 | tee "$OUT/run.log"
import copy, json, logging, os, platform, time
from pathlib import Path

import numpy as np
import torch

from dcgan.evaluation.cifar import cifar10_protocol, load_labelled_images, seeded
from dcgan.train import Trainer, TrainConfig

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
log = logging.getLogger("dcgan.gpu_cifar10")
device, tables, out = os.environ["DEVICE"], Path(os.environ["DATA"]) / "tables", Path(os.environ["OUT"])
limit = lambda name: int(os.environ[name]) if os.environ[name] else None  # noqa: E731
small = device == "cpu"
cfg = TrainConfig(
    shards=str(tables), run_dir="/tmp/gpu_cifar10_run", resolution=32, batch_size=int(os.environ["BATCH"]),
    discriminator=os.environ["DISCRIMINATOR"], device=device, **({"ngf": 8, "ndf": 8} if small else {}),
)
t0 = time.perf_counter()
images, _ = load_labelled_images(tables / "train.parquet")
trainer = Trainer(cfg)
if trainer.device.type == "cuda":
    torch.backends.cudnn.benchmark = True
cache = torch.from_numpy(images).to(trainer.device)  # (N, 32, 32, 3) uint8: batches are channels_last views
decode_s = time.perf_counter() - t0
log.info("CIFAR-10 train: %d images decoded into a cache on %s in %.0f s; step: %s",
         len(cache), trainer.device, decode_s, trainer.options.describe())
gen = torch.Generator(device=trainer.device).manual_seed(cfg.seed)
perm, pos, budget = torch.randperm(len(cache), generator=gen, device=trainer.device), 0, float(os.environ["TRAIN_S"])
t0 = time.perf_counter()
while time.perf_counter() - t0 < budget:
    if pos + cfg.batch_size > len(cache):
        perm, pos = torch.randperm(len(cache), generator=gen, device=trainer.device), 0
    trainer.runner(cache[perm[pos : pos + cfg.batch_size]].permute(0, 3, 1, 2), trainer.noise(trainer.step))
    pos += cfg.batch_size
    trainer.step += 1
    if trainer.step % 2000 == 0:
        log.info("step %d, %.0f img/s", trainer.step, trainer.step * cfg.batch_size / (time.perf_counter() - t0))
if trainer.device.type == "cuda":
    torch.cuda.synchronize()
train_s = time.perf_counter() - t0
epochs = trainer.step * cfg.batch_size / len(cache)
finite = bool(trainer.weights_finite())
log.info("trained %d steps (%.1f epochs) in %.0f s; weights finite: %s", trainer.step, epochs, train_s, finite)
del cache
D = trainer.D.eval()
random_d = seeded(copy.deepcopy(D), seed=12345)
t0 = time.perf_counter()
results = cifar10_protocol(D, random_d, tables, 32, limit_train=limit("LIMIT_TRAIN"), limit_test=limit("LIMIT_TEST"),
                           device=str(trainer.device))
protocol_s = time.perf_counter() - t0
report = {
    "machine": torch.cuda.get_device_name() if trainer.device.type == "cuda" else platform.processor() or "cpu",
    "torch": torch.__version__, "step": trainer.options.describe(), "discriminator": cfg.discriminator,
    "batch_size": cfg.batch_size, "steps": trainer.step, "epochs": epochs, "train_seconds": train_s,
    "img_per_s": trainer.step * cfg.batch_size / train_s, "weights_finite": finite,
    "protocol_seconds": protocol_s, "cifar10": results,
}
(out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
lines = [
    f"# CIFAR-10 protocol on {report['machine']}", "",
    f"Training: {cfg.discriminator} D, batch {cfg.batch_size}, {report['step']}: {trainer.step} steps = "
    f"{epochs:.1f} epochs in {train_s:.0f} s ({report['img_per_s']:.0f} img/s).",
    f"Protocol (decode + features + SVMs for all three): {protocol_s:.0f} s.", "",
    "| features | test accuracy | C | grid end | dim | SVM train | test | precision | feature s | SVM s |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for name, r in results.items():
    lines.append(
        f"| {name} | {r['test_accuracy'] * 100:.2f}% | {r['C']:g} | {r['c_grid_end'] or '-'} | {r['feature_dim']} | "
        f"{r['n_train']} | {r['n_test']} | {r['precision']} | {r['feature_seconds']:.0f} | {r['svm_seconds']:.0f} |"
    )
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
    ;;
*)
    echo "usage: bash scripts/gpu_cifar10.sh prepare|run" >&2
    exit 2
    ;;
esac
