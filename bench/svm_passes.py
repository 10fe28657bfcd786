"""Benchmark: the two kernels the CIFAR-10 protocol's time goes to, float32 against bfloat16, in one process.

1. One Hessian pass of the L2-SVM's Newton-CG (`dcgan.evaluation.svm._hessian_pass`: X_b p, then
   X_b^T of it, block by block) over an (n, 28,672) standardised matrix with 10 columns: the
   block size the solver had (256 rows, float32), the float32 block it uses now (32 rows) and
   the bfloat16 copy (1024 rows). The matrix is Gaussian: a pass's time depends on its shape only.
2. D features (`extract_features`) of real CIFAR-10 test images by the paper's 32 px ImageNet D
   (random weights, seed 12345) in float32 and under bfloat16 autocast, with the relative
   difference of the two feature matrices.

Each timing is the best of `--repeats` rounds after one untimed call each, the variants alternating within a round.

    python bench/svm_passes.py              # 45,000 rows (the protocol's fit split), 3,072 images
    python bench/svm_passes.py --rows 4096 --images 512   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

from dcgan.evaluation import svm  # noqa: E402
from dcgan.evaluation.cifar import load_labelled_images, seeded  # noqa: E402
from dcgan.evaluation.features import extract_features  # noqa: E402
from dcgan.models import ImageNetDiscriminator32  # noqa: E402
from dcgan.precision import fastest  # noqa: E402


def pass_with_block(x: torch.Tensor, block: int) -> None:
    """A Hessian pass with `block` rows per fused block (the solver's own loop, its block size forced)."""
    chunk = svm._chunk
    svm._chunk = lambda _x: block
    try:
        p = torch.randn(x.shape[1], 10)
        svm._hessian_pass(x, p, torch.zeros(10), torch.ones(len(x), 10))
    finally:
        svm._chunk = chunk


def time_passes(rows: int, features: int, repeats: int) -> dict[str, float]:
    """Best time of one Hessian pass per variant (the matrices are freed on return)."""
    x = torch.randn(rows, features)
    xh = svm.hessian_copy(x, True)
    return fastest(
        {
            "float32, 256-row blocks (before)": lambda: pass_with_block(x, 256),
            "float32, 32-row blocks": lambda: pass_with_block(x, 32),
            "bfloat16 copy, 1024-row blocks": lambda: pass_with_block(xh, 1024),
        },
        rounds=repeats,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=45_000)
    ap.add_argument("--features", type=int, default=28_672)
    ap.add_argument("--images", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )

    passes = time_passes(args.rows, args.features, args.repeats)
    base = passes["float32, 256-row blocks (before)"]
    print(f"\nHessian pass over {args.rows} x {args.features}, 10 columns")
    print("| variant | seconds | speed-up |\n|---|---|---|")
    for name, seconds in passes.items():
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x |")

    images, _ = load_labelled_images(SHARED / "data" / "cifar10" / "test.parquet", limit=args.images)
    D = seeded(ImageNetDiscriminator32(), 12345)
    out = {}
    timings = fastest(
        {
            p: lambda p=p: out.__setitem__(p, extract_features(D, images, precision=p).astype(np.float32))
            for p in ("fp32", "bf16")
        },
        rounds=args.repeats,
    )
    error = np.linalg.norm(out["bf16"] - out["fp32"]) / np.linalg.norm(out["fp32"])
    print(f"\nD features of {args.images} CIFAR-10 test images (imagenet32 D, random weights)")
    print("| precision | images/s | speed-up |\n|---|---|---|")
    for p, seconds in timings.items():
        print(f"| {p} | {args.images / seconds:.0f} | {timings['fp32'] / seconds:.2f}x |")
    print(f"relative difference of the bf16 features: {error:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
