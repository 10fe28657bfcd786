"""Data-parallel training under torchrun: process group, device per rank, replica checks.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them training is one process. The
batch size is per process (global batch = batch_size x world size) and the learning rate
is used as given, as in torch's DDP examples. NCCL on CUDA, gloo on CPU (the CI test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from preprocessing.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


class DeviceError(UserError):
    """The requested device does not exist on the machine that runs the step."""


def world_from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World, requested: str) -> torch.device:
    """The device of this process: `cuda` means this rank's local GPU under torchrun."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda:") and world.distributed:
        raise DeviceError(f"under torchrun use --device cuda (each rank takes its LOCAL_RANK GPU), not {requested}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA device is available (use --device cpu)")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"{requested} does not exist: {torch.cuda.device_count()} GPUs are visible")
    if requested == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"local rank {world.local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        requested = f"cuda:{world.local_rank}"
    device = torch.device(requested)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_process_group(world: World, device: torch.device) -> None:
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """A copy of `t` averaged over the processes (the statistics every rank decides on)."""
    t = t.detach().clone()
    if world.distributed:
        dist.all_reduce(t)
        t /= world.size
    return t


def replicas_in_sync(modules: list[torch.nn.Module], world: World) -> bool:
    """True when every rank holds the same weights (a cheap checksum, compared by min and max)."""
    if not world.distributed:
        return True
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()])
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.allclose(hi, lo, rtol=0, atol=1e-6 * (1 + float(sums.abs().max()))))
