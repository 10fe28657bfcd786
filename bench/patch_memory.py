"""Our CPU training step with the wide layers' patch matrices in reused scratch memory, against fresh memory.

The baseline is the same step, in the same process, with `dcgan.layers.scratch` replaced by a plain
allocation per call (what the layers did before): the two take turns for --repeats rounds. Prints
img/s (best round), 4 KB page faults a step (getrusage) and huge-page faults a step (the machine's
/proc/vmstat thp_fault_alloc, so other processes count too), and the ratio. Same numbers either way:
only where the patches live changes.

    python bench/patch_memory.py --resolution 32
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcgan.layers as layers  # noqa: E402
from dcgan.train import TrainConfig, Trainer  # noqa: E402


def huge_page_faults() -> int:
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("thp_fault_alloc "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fresh(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The baseline: a new tensor on every call."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    r = args.resolution
    cfg = TrainConfig(
        shards="",
        run_dir=tempfile.mkdtemp(prefix="bench-patch-"),
        resolution=r,
        batch_size=args.batch,
        device="cpu",
        best_images=0,
        tensorboard=False,
    )
    trainer = Trainer(cfg)
    print(f"# cpu, torch {torch.__version__}; ours: {trainer.options.describe()}; batch {args.batch}, {r} px")
    real = torch.randint(0, 256, (args.batch, r, r, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    reused = layers.scratch
    paths = {"fresh memory": fresh, "scratch": reused}
    stats = {name: [0.0, [], []] for name in paths}  # best img/s, faults a step, huge-page faults a step
    for step in range(3):
        trainer.runner(real, trainer.noise(step))
    try:
        for _ in range(args.repeats):
            for name, allocate in paths.items():
                layers.scratch = allocate
                trainer.runner(real, trainer.noise(0))  # one untimed step on this allocator
                before, huge = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, huge_page_faults()
                t = time.perf_counter()
                for step in range(args.steps):
                    trainer.runner(real, trainer.noise(step))
                seconds = time.perf_counter() - t
                row = stats[name]
                row[0] = max(row[0], args.steps * args.batch / seconds)
                row[1].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.steps)
                row[2].append((huge_page_faults() - huge) / args.steps)
    finally:
        layers.scratch = reused
    base = stats["fresh memory"][0]
    for name, (rate, faults, huge) in stats.items():
        print(
            f"{name:13s} {rate:7.0f} img/s  page faults a step {sorted(faults)[len(faults) // 2]:7.0f}  "
            f"huge-page faults a step {sorted(huge)[len(huge) // 2]:5.1f}  ratio {rate / base:.2f}x"
        )


if __name__ == "__main__":
    main()
