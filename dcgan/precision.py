"""bfloat16 where it pays: the training step, and the evaluation's D features and SVM Hessian products.

bfloat16 keeps float32's range with an 8-bit mantissa. A GPU's tensor cores, and CPUs with
bfloat16 dot products (AVX512-BF16, AMX), run convolutions and matrix products in it 2-3x
faster than in float32; CPUs without them emulate it and run slower. "auto" therefore times one
product both ways, once per device and process, and training and evaluation share that decision.
What bfloat16 changes is measured in docs/benchmarks.md:
features within about 0.3% (relative) of float32's; the SVM's optimum not at all (its gradient
stays float32, so only the Newton steps' directions are approximate).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import get_args

import torch

from dcgan.settings import Precision

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = get_args(Precision)


def use_bfloat16(precision: str, device: str | torch.device) -> bool:
    """Whether `precision` ("auto", "fp32" or "bf16") means bfloat16 on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return _bfloat16_is_faster(torch.device(device))


@functools.cache
def _bfloat16_is_faster(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    a, b = torch.randn(1024, 4096), torch.randn(4096, 64)
    fp32, bf16 = _seconds(a, b), _seconds(a.bfloat16(), b.bfloat16())
    faster = bf16 < 0.75 * fp32
    log.info(
        "bfloat16 products on this CPU take %.2fx the time of float32: precision auto means %s",
        bf16 / fp32,
        "bfloat16" if faster else "float32",
    )
    return faster


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    """Best of three timings of a @ b."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best
