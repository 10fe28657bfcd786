"""Training throughput: pytorch/examples' textbook loop against ours, in one process.

For each batch size: the textbook step (eager fp32, Sigmoid + BCELoss, stock Adam) and ours
(by default on CUDA: bf16 autocast, channels_last, fused Adam, one CUDA graph per step; on the
CPU: bf16 autocast where the CPU has bf16 products, channels_last, fused Adam, the fast layers of
dcgan.layers) on synthetic uint8 batches already on the device; with --ablate ours again without
the fast layers; ours again fed from real shards through the
GPU cache, and (with --stream-workers) through the WebDataset loader. The paths take turns
for --repeats rounds and the best round of each counts. Prints img/s,
achieved TFLOP/s (FLOPs of one step counted by torch's FlopCounterMode) against a bf16
matmul peak measured in the same process, and each ratio against the textbook loop.

    python bench/train_throughput.py --shards work/shards            # on a GPU box
    python bench/train_throughput.py --device cpu --resolution 32    # batch 128, 10 steps a round
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcgan.data import CachedImages, shard_urls, stream_batches  # noqa: E402
from dcgan.distributed import World  # noqa: E402
from dcgan.step import StepOptions  # noqa: E402
from dcgan.train import TrainConfig, Trainer, step_options  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Best of a few large matmuls, FLOP/s: bf16 on CUDA, fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


def config(args: argparse.Namespace, batch: int, shards: str) -> TrainConfig:
    return TrainConfig(
        shards=shards,
        run_dir=tempfile.mkdtemp(prefix="bench-train-"),
        resolution=args.resolution,
        batch_size=batch,
        ngf=args.width,
        ndf=args.width,
        device=args.device,
        best_images=0,
        tensorboard=False,
    )


def flops_per_image(args: argparse.Namespace, batch: int, options: StepOptions) -> float:
    """FLOPs of one eager D+G update, per image (ours skips D's weight gradients in the G step)."""
    trainer = Trainer(config(args, batch, ""), options=options)
    real = torch.randint(0, 256, (batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        trainer.runner(real.to(trainer.device), trainer.noise(0))
    return counter.get_total_flops() / batch


def rate(trainer: Trainer, feed: Callable[[int], torch.Tensor], steps: int, warmup: int) -> float:
    for step in range(warmup):
        trainer.runner(feed(step), trainer.noise(step))
    sync(trainer.device)
    t = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.runner(feed(step), trainer.noise(step))
    trainer.acc.tolist()  # waits for the last step
    return steps * trainer.cfg.batch_size / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--batches", default=None, help="comma-separated (default: 128,1024 on CUDA, 128 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 200 CUDA, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 20 CUDA, 3 CPU)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds over all paths; the best of each counts (default: 3 CUDA, 5 CPU)",
    )
    parser.add_argument("--shards", default=None, help="final shards at --resolution, for the real-data rows")
    parser.add_argument("--stream-workers", type=int, default=0, help="also feed ours through WebDataset workers")
    parser.add_argument(
        "--ablate", action="store_true", help="also time ours without the fast layers (dcgan.layers), same process"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batches = args.batches or ("128,1024" if cuda else "128")
    args.steps = args.steps or (200 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    args.repeats = args.repeats or (3 if cuda else 5)  # a shared 2-core VM: memory-bound ops stall at random
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak, peak_what = matmul_peak(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {card}, torch {torch.__version__}; peak {peak / 1e12:.1f} TFLOP/s ({peak_what})")
    ours_opts = step_options(config(args, 2, ""), device, World())
    print(f"# ours: {ours_opts.describe()}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        per_image = {tb: flops_per_image(args, batch, StepOptions(textbook=tb)) for tb in (True, False)}
        synthetic = torch.randint(0, 256, (batch, args.resolution, args.resolution, 3), dtype=torch.uint8)
        synthetic = synthetic.to(device).permute(0, 3, 1, 2)
        feeds: list[tuple[str, str, StepOptions, Callable[[int], torch.Tensor]]] = [  # path, data, options, feed
            ("textbook", "synthetic", StepOptions(textbook=True), lambda step, s=synthetic: s),
            ("ours", "synthetic", ours_opts, lambda step, s=synthetic: s),
        ]
        if args.ablate:
            no_fast = replace(ours_opts, fast_layers=False)
            feeds.append(("ours", "synthetic, no fast layers", no_fast, lambda step, s=synthetic: s))
        if args.shards:
            urls, total = shard_urls(Path(args.shards), args.resolution)
            cache = CachedImages(urls, total, seed=0, device=device)
            feeds.append(("ours", "shards (cache)", ours_opts, lambda step, c=cache, b=batch: c.batch(step, b)))
            if args.stream_workers:
                stream = stream_batches(urls, total, batch, seed=0, workers=args.stream_workers)
                data = f"shards (stream, {args.stream_workers} workers)"
                feeds.append(("ours", data, ours_opts, lambda step, s=stream: next(s).to(device, non_blocking=True)))
        trainers = [Trainer(config(args, batch, args.shards or ""), options=opts) for _, _, opts, _ in feeds]
        best = [0.0] * len(feeds)
        for repeat in range(args.repeats):  # alternate the paths: a noisy machine hurts them alike
            for i, ((_, _, _, feed), trainer) in enumerate(zip(feeds, trainers, strict=True)):
                best[i] = max(best[i], rate(trainer, feed, args.steps, args.warmup if repeat == 0 else 0))
        for (path, data, opts, _), r in zip(feeds, best, strict=True):
            flops = per_image[opts.textbook]
            tflops = r * flops / 1e12
            row = dict(path=path, data=data, batch=batch, img_per_s=r, tflops=tflops, ratio=r / best[0])
            row.update(peak_fraction=tflops * 1e12 / peak, gflop_per_image=flops / 1e9)
            rows.append(row)
            print(
                f"{path:9s} {data:34s} batch {batch:5d}  {r:10.0f} img/s  {tflops:7.2f} TFLOP/s "
                f"({100 * row['peak_fraction']:5.1f}% of peak)  ratio {row['ratio']:.2f}x"
            )
        del trainers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# one step per image: textbook {per_image[True] / 1e9:.3f} GFLOP, ours {per_image[False] / 1e9:.3f}")
    if args.json:
        report = {"card": card, "torch": torch.__version__, "peak": peak, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
