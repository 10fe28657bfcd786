#!/usr/bin/env bash
# The GPU checks of the training issue in one device call (about 3-5 minutes on an H100):
# bench/train_throughput.py (textbook vs ours, batch 128 and 1024, synthetic and from real
# shards) and two short real runs on CelebA faces (textbook and fast, same seed) with their
# sample grids and a side-by-side of their losses. Everything lands under $OUT.
#
#   here, once:   bash scripts/gpu_check.sh prepare   # shards + wheels into gpu_check/ (git-ignored, ~50 MB)
#   device tool:  run(command="bash scripts/gpu_check.sh run", carry=["gpu_check"], timeout_s=540)
#   CPU smoke:    GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh run   (tiny sizes: checks the script, not speed)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=gpu_check

case "${1:-}" in
prepare)
    mkdir -p "$DATA/wheels"
    # the device image has torch, opencv, pyarrow, tensorboard, tqdm; the rest travels as wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DATA/wheels" -r scripts/device-wheels.txt
    python3 bench/check_shards.py --out "$DATA" --count "${GPU_CHECK_IMAGES:-4000}"
    du -sh "$DATA"
    ;;
run)
    OUT=${OUT:-$DATA/out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
    if [ "$DEVICE" = cuda ]; then  # the wheels are for the device's Python 3.12; a CPU smoke run uses this machine's
        python3 -m pip install -q --no-index --no-deps --target /tmp/site "$DATA"/wheels/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
        nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
        BENCH=(--batches 128,1024 --steps 200 --warmup 20 --stream-workers 8)
        RUN='"steps": 3000, "batch_size": 128, "log_every": 100, "sample_every": 1000, "checkpoint_every": 1000'
    else
        export PYTHONPATH="$PWD"
        BENCH=(--batches 8 --steps 2 --warmup 1 --repeats 1 --width 8 --stream-workers 1)
        RUN='"steps": 4, "batch_size": 16, "ngf": 8, "ndf": 8, "log_every": 2, "sample_every": 2, "checkpoint_every": 2'
    fi
    python3 bench/train_throughput.py --device "$DEVICE" --shards "$DATA/shards" "${BENCH[@]}" \
        --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
    for loop in textbook fast; do
        printf '{"shards": "%s", "run_dir": "%s", "resolution": 64, "device": "%s", "loop": "%s", %s}\n' \
            "$DATA/shards" "$OUT/celeba-$loop" "$DEVICE" "$loop" "$RUN" >"$OUT/celeba-$loop.json"
        python3 -m dcgan.launch --config "$OUT/celeba-$loop.json" 2>&1 | tee "$OUT/celeba-$loop.log"
        rm -f "$OUT/celeba-$loop"/checkpoints/*.pt  # 76 MB each at 64 px; best.json and samples stay
    done
    python3 bench/compare_runs.py "$OUT/celeba-textbook" "$OUT/celeba-fast" | tee "$OUT/compare.txt"
    # at most 8 files come back from the device: the runs (samples, metrics, logs) travel as one archive
    tar -czf "$OUT/runs.tar.gz" -C "$OUT" celeba-textbook celeba-fast celeba-textbook.json celeba-fast.json \
        celeba-textbook.log celeba-fast.log
    rm -rf "$OUT"/celeba-textbook* "$OUT"/celeba-fast*
    ls "$OUT"
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
