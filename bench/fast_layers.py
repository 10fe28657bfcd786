"""The fast layers (dcgan/layers.py) against torch's layers, in one process.

Each pair computes the same function with the same weights; both run forward and the
backward the training step asks of that layer (input and/or weight gradient), under the
step's precision (bf16 autocast + channels_last on a CPU with bf16 products, else fp32).
Prints ms per call of each and the ratio torch / fast (best of --repeats rounds).

    python bench/fast_layers.py --resolution 32 --batch 128
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan.layers import (  # noqa: E402
    ImageConv2d,
    ImageTranspose2d,
    LogitConv2d,
    ProjectTranspose2d,
    WideConv2d,
    WideTranspose2d,
)
from dcgan.precision import use_bfloat16  # noqa: E402


def best_ms(fn: Callable[[], None], calls: int, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
    return best


def pass_of(layer: nn.Module, x: torch.Tensor, grad_x: bool, grad_w: bool, bf16: bool) -> Callable[[], None]:
    def run() -> None:
        inp = x.detach().requires_grad_(grad_x)
        layer.weight.requires_grad_(grad_w)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(inp)
        y.float().sum().backward()
        layer.weight.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bf16 = use_bfloat16("auto", torch.device("cpu"))
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    n, r, w = args.batch, args.resolution, args.width
    top = w * r // 8  # G's first and D's last width
    cases = [  # (name, fast, torch, constructor args, input shape, (grad x, grad w) per use in a step)
        ("G projection of z", ProjectTranspose2d, nn.ConvTranspose2d, (100, top, 4, 1, 0), (n, 100, 1, 1), [(0, 1)]),
        ("D logit", LogitConv2d, nn.Conv2d, (top, 1, 4, 1, 0), (n, top, 4, 4), [(0, 1), (1, 0)]),
        ("G image layer", ImageTranspose2d, nn.ConvTranspose2d, (w, 3, 4, 2, 1), (n, w, r // 2, r // 2), [(1, 1)]),
        ("D image layer", ImageConv2d, nn.Conv2d, (3, w, 4, 2, 1), (n, 3, r, r), [(0, 1), (1, 0)]),
    ]
    for i in range(r.bit_length() - 4):  # the inner stride-2 layers; their input gradients run as before
        c, side = w * 2**i, r // 2 ** (i + 1)
        cases.append(
            (f"D {c}->{2 * c} at {side} px", WideConv2d, nn.Conv2d, (c, 2 * c, 4, 2, 1), (n, c, side, side), [(1, 1)])
        )
        c, side = top // 2**i, 4 * 2**i
        cases.append(
            (
                f"G {c}->{c // 2} at {side} px",
                WideTranspose2d,
                nn.ConvTranspose2d,
                (c, c // 2, 4, 2, 1),
                (n, c, side, side),
                [(1, 1)],
            )
        )
    print(f"# cpu, torch {torch.__version__}, {'bf16 autocast, channels_last' if bf16 else 'fp32'}, batch {n}, {r} px")
    for name, fast_cls, torch_cls, ctor, shape, uses in cases:
        fast = fast_cls(*ctor, bias=False).to(memory_format=fmt)
        ref = torch_cls(*ctor, bias=False).to(memory_format=fmt)
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(shape).contiguous(memory_format=fmt)
        for grad_x, grad_w in uses:
            what = "+".join(g for g, on in (("input grad", grad_x), ("weight grad", grad_w)) if on)
            times = []
            for layer in (ref, fast):
                times.append(best_ms(pass_of(layer, x, bool(grad_x), bool(grad_w), bf16), args.calls, args.repeats))
            print(
                f"{name:20s} forward+{what:23s} torch {times[0]:6.2f} ms  fast {times[1]:6.2f} ms  "
                f"ratio {times[0] / times[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
