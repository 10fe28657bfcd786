"""bfloat16 where it pays: the training step, and the evaluation's D features and SVM Hessian products.

bfloat16 keeps float32's range with an 8-bit mantissa. A GPU's tensor cores, and CPUs with
bfloat16 dot products (AVX512-BF16, AMX), run convolutions and matrix products in it 2-3x
faster than in float32; CPUs without them emulate it and run slower. "auto" therefore times one
product both ways, once per device and process, and training and evaluation share that decision.
The timing warms both up and alternates them over several rounds: timed back to back once each,
a busy moment (the pipeline's other threads, the Prefect server) once made this CPU's bfloat16
look 1.68x slower than float32 instead of 0.43x, and a recipe started training in float32 at 0.4x the speed.
What bfloat16 changes is measured in docs/benchmarks.md:
features within about 0.3% (relative) of float32's; the SVM's optimum not at all (its gradient
stays float32, so only the Newton steps' directions are approximate).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
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
    a16, b16 = a.bfloat16(), b.bfloat16()
    best = fastest({"float32": lambda: a @ b, "bfloat16": lambda: a16 @ b16})
    faster = best["bfloat16"] < 0.75 * best["float32"]
    log.info(
        "bfloat16 products on this CPU take %.2fx the time of float32: precision auto means %s",
        best["bfloat16"] / best["float32"],
        "bfloat16" if faster else "float32",
    )
    return faster


def fastest(calls: dict[str, Callable[[], object]], rounds: int = 7) -> dict[str, float]:
    """Each call's best time in seconds: one untimed call each (first-call set-up), then `rounds`
    rounds that run them in turn, so that a busy moment slows all of them, not just one."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
