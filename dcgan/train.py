"""The DCGAN training loop with the paper's hyper-parameters, fast paths and exact resume.

Defaults follow Radford et al. (2015): Adam(lr 2e-4, beta1 0.5), batch 128, z of 100
dimensions drawn uniformly from [-1, 1], N(0, 0.02) initialisation. Each step draws its
batch and noise from generators seeded by (seed, step), so training is a pure function of
the config and the data; a checkpoint plus the step replays the rest of the run exactly.

The default step is bf16 autocast + channels_last + fused Adam where bfloat16 is faster
(a GPU, or a CPU with bfloat16 products: `dcgan.precision`), on CUDA captured whole as a
CUDA graph and fed from a uint8 cache in GPU memory (`dcgan.step`, `dcgan.data`); each is
a flag, as are the faster forms of G's and D's strided layers on the CPU (`dcgan.layers`),
and `loop="textbook"` runs pytorch/examples' eager fp32 loop for comparison.
Under torchrun the same loop runs data-parallel (`dcgan.distributed`); rank 0 alone
writes. A non-finite loss or weight rolls back to the last good checkpoint (kept in
memory as the bytes written to disk) with a lower learning rate, or stops.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel
from torchvision.utils import make_grid, save_image

from dcgan.checkpoint import (
    BEST,
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    list_checkpoints,
    load_checkpoint,
    record_checksum,
    write_checkpoint,
)
from dcgan.data import CachedImages, DataError, shard_checksums, shard_urls, stream_batches
from dcgan.distributed import World, all_mean, device_for, init_process_group, replicas_in_sync, world_from_env
from dcgan.evaluation.quality import generate, prior_noise, real_images, sliced_wasserstein_distance
from dcgan.models import Generator, build_discriminator, init_weights
from dcgan.monitor import Monitor
from dcgan.precision import use_bfloat16
from dcgan.settings import TrainSettings
from dcgan.step import METRICS, StepOptions, StepRunner, make_adam
from preprocessing.atomic import atomic_write_bytes, atomic_write_json
from preprocessing.errors import UserError

log = logging.getLogger(__name__)

# Settings that define the model; a checkpoint can only resume a run that agrees on them.
ARCH_FIELDS = ("resolution", "nz", "ngf", "ndf", "noise", "discriminator")


class TrainingDiverged(UserError):
    """A loss stayed NaN or infinite (lower lr or other settings); no poisoned checkpoint was written."""


class TrainConfig(TrainSettings):
    """The settings of a run plus where it reads and writes: what one training process runs."""

    shards: str = Field(description="shard directory (WORK/shards)")
    run_dir: str = Field(description="run directory (WORK/train/RUN)")

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gb * (1 << 30))


def resolve_device(name: str) -> torch.device:
    """The device a single-process run would use; a clear error where CUDA is missing."""
    return device_for(World(), name)


def step_options(cfg: TrainConfig, device: torch.device, world: World) -> StepOptions:
    """Which fast paths apply: bf16 (+ channels_last) where it is faster, fused Adam, the fast layers
    on the CPU, CUDA graphs on CUDA."""
    if cfg.loop == "textbook":
        return StepOptions(textbook=True)
    cuda = device.type == "cuda"
    low = use_bfloat16(cfg.precision, device)
    return StepOptions(
        autocast=torch.bfloat16 if low else None,
        channels_last=low and cfg.channels_last,
        fused_adam=cfg.fused_adam,
        fast_layers=cfg.fast_layers and device.type == "cpu",
        cuda_graph=cuda and cfg.cuda_graphs and not world.distributed,
    )


def sample_noise(cfg: TrainConfig, n: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg.noise == "uniform":
        z = torch.rand(n, cfg.nz, generator=g) * 2 - 1
    else:
        z = torch.randn(n, cfg.nz, generator=g)
    return z.to(device)


class Trainer:
    """Owns the models, optimizers and step of one training process."""

    def __init__(self, cfg: TrainConfig, world: World | None = None, options: StepOptions | None = None) -> None:
        self.cfg = cfg
        self.world = world or World()
        self.device = device_for(self.world, cfg.device)
        self.options = options or step_options(cfg, self.device, self.world)
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        fast = self.options.fast_layers
        self.G = Generator(cfg.resolution, cfg.nz, cfg.ngf, fast_layers=fast).to(self.device)
        self.D = build_discriminator(cfg.discriminator, cfg.resolution, cfg.ndf, fast).to(self.device)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        if self.options.channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.optG = make_adam(self.G.parameters(), cfg.lr, cfg.beta1, self.options)
        self.optD = make_adam(self.D.parameters(), cfg.lr, cfg.beta1, self.options)
        self.G_train, self.D_train = self.G, self.D
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_train = DistributedDataParallel(self.G, device_ids=ids)
            self.D_train = DistributedDataParallel(self.D, device_ids=ids)
        self.acc = torch.zeros(len(METRICS), device=self.device)
        self.fixed_noise = sample_noise(cfg, 64, cfg.seed + 1, self.device)
        self._noise = torch.Generator(device=self.device)
        self.step = 0
        self.runner = self.new_runner()

    def new_runner(self) -> StepRunner:
        """A fresh step (a new CUDA graph is captured on first use: needed after an lr change)."""
        return StepRunner(self.G_train, self.D_train, self.D, self.optG, self.optD, self.options, self.acc)

    def noise(self, step: int) -> torch.Tensor:
        """z of `step` for this rank, drawn on the training device (no host copy per step)."""
        n, w = self.cfg.batch_size, self.world
        self._noise.manual_seed(_step_seed(self.cfg.seed, step * w.size + w.rank))
        if self.cfg.noise == "uniform":
            return torch.rand(n, self.cfg.nz, generator=self._noise, device=self.device).mul_(2).sub_(1)
        return torch.randn(n, self.cfg.nz, generator=self._noise, device=self.device)

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "config": self.cfg.model_dump(),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "optG": self.optG.state_dict(),
            "optD": self.optD.state_dict(),
            "fixed_noise": self.fixed_noise.cpu(),
            "rng": rng,
        }

    def load(self, path: Path) -> None:
        self.load_state(load_checkpoint(path), str(path))

    def load_state(self, state: dict[str, Any], source: str) -> None:
        saved = state.get("config", {})
        clash = self._arch_clash(saved)
        if clash:
            detail = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in clash.items())
            raise CheckpointError(f"{source} belongs to an incompatible model ({detail})")
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.optG.load_state_dict(state["optG"])
            self.optD.load_state_dict(state["optD"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{source} does not fit the model: {exc}") from exc
        explicit_lr = saved.get("lr", self.cfg.lr) != self.cfg.lr  # a new --lr wins over the saved (maybe lowered) one
        for opt in (self.optG, self.optD):
            _adopt_optimizer_flags(opt, self.cfg.lr if explicit_lr else None)
        self.fixed_noise = state["fixed_noise"].to(self.device)
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        self.runner = self.new_runner()

    def _arch_clash(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{field: (checkpoint's, ours)} of the model-defining settings that differ (older files: defaults)."""
        arch = {k: saved.get(k, TrainSettings.model_fields[k].default) for k in ARCH_FIELDS}
        return {k: (arch[k], getattr(self.cfg, k)) for k in ARCH_FIELDS if arch[k] != getattr(self.cfg, k)}

    def warm_start(self, path: Path) -> None:
        """Take G's and D's weights from another run's checkpoint; optimizers, step and noise start fresh."""
        state = load_checkpoint(path)
        clash = self._arch_clash(state.get("config", {}))
        if clash:
            raise CheckpointError(f"init_from {path} is another model ({', '.join(clash)} differ): cannot warm-start")
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"init_from {path} does not fit the model: {exc}") from exc
        self.runner = self.new_runner()

    def scale_lr(self, factor: float) -> float:
        for opt in (self.optG, self.optD):
            for group in opt.param_groups:
                group["lr"] *= factor
        self.runner = self.new_runner()
        return self.lr

    @property
    def lr(self) -> float:
        return float(self.optG.param_groups[0]["lr"])

    def weights_finite(self) -> bool:
        sums = [p.detach().float().sum() for m in (self.G, self.D) for p in m.parameters()]
        return bool(torch.isfinite(torch.stack(sums)).all())

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """An 8x8 grid from the fixed noise; G's batchnorm buffers are restored afterwards."""
        buffers = {k: v.clone() for k, v in self.G.named_buffers()}
        images = self.G(self.fixed_noise)
        for k, v in self.G.named_buffers():
            v.copy_(buffers[k])
        return make_grid(images.float().cpu(), nrow=8, normalize=True, value_range=(-1, 1))


def _adopt_optimizer_flags(opt: torch.optim.Optimizer, lr: float | None) -> None:
    """Keep this optimizer's own fused/capturable/foreach flags after loading a state dict.

    `load_state_dict` takes them from the file, so a checkpoint from a CUDA run would make
    a CPU resume use a fused, capturable Adam; Adam's step counter must then also live
    where the flags expect it, and the moments keep the file's memory layout, which fused
    CUDA Adam rejects when it differs from the parameters' (channels_last vs contiguous).
    """
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    for group in opt.param_groups:
        for key in ("foreach", "fused", "capturable"):
            group[key] = opt.defaults.get(key)
        if lr is not None:
            group["lr"] = lr
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "step" in st:
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)
            for key, value in st.items():  # fused CUDA Adam needs moments laid out like their parameter
                if key != "step" and torch.is_tensor(value) and value.stride() != p.stride():
                    st[key] = torch.empty_like(p).copy_(value)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + 1) % (1 << 63)


def _trim_jsonl(path: Path, step: int) -> None:
    """Drop lines written after `step` (a resume or rollback is about to write them again)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _open_data(trainer: Trainer) -> tuple[Callable[[int], torch.Tensor], int]:
    cfg, world, device = trainer.cfg, trainer.world, trainer.device
    urls, total = shard_urls(Path(cfg.shards), cfg.resolution)
    if cfg.batch_size * world.size > total:
        raise DataError(
            f"batch size {cfg.batch_size} x {world.size} processes is larger than the dataset ({total} images)"
            if world.distributed
            else f"batch size {cfg.batch_size} is larger than the dataset ({total} images)"
        )
    need = total * 3 * cfg.resolution**2
    if need <= cfg.cache_bytes:
        where = torch.device("cpu")
        if device.type == "cuda" and cfg.gpu_cache:
            free, _ = torch.cuda.mem_get_info(device)
            where = device if need < free // 2 else where
            if where.type == "cpu":
                log.warning("a %.1f GB cache exceeds half the free GPU memory: keeping it in host RAM", need / 1e9)
        cache = CachedImages(urls, total, cfg.seed, where, checksums=shard_checksums(Path(cfg.shards)))
        log.info("decoded %d images into a %.1f MB cache on %s", len(cache), need / 1e6, where)
        rank, size = world.rank, world.size
        return lambda step: cache.batch(step, cfg.batch_size, rank, size).to(device, non_blocking=True), total
    log.info("dataset needs %.1f GB > cache budget; streaming from %d shards", need / 1e9, len(urls))
    stream = stream_batches(urls, total, cfg.batch_size, cfg.seed + trainer.step, cfg.workers, world.rank, world.size)
    return lambda step: next(stream).to(device, non_blocking=True), total


class BestKeeper:
    """Keeps `best.pt`: the checkpoint with the lowest SWD to the training images so far.

    DCGAN samples are known to get worse late in training; SWD on Laplacian patches is cheap
    (no pretrained network) and is measured at each checkpoint on `best_images` samples.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.n = trainer.cfg.best_images
        self.folder = trainer.run_dir / "checkpoints"
        record = self.folder / "best.json"
        self.best = json.loads(record.read_text()) if record.exists() else None
        self._real: np.ndarray | None = None
        self._z = prior_noise(trainer.cfg.nz, trainer.cfg.noise, self.n, trainer.cfg.seed + 2)

    def update(self, step: int, data: bytes) -> dict[str, float] | None:
        if self.n == 0:
            return None
        if self._real is None:
            self._real = real_images(self.trainer.cfg.shards, self.n, seed=1)
        fake = generate(self.trainer.G, self._z[: len(self._real)])  # eval mode, as the evaluation flow
        self.trainer.G.train()
        swd = sliced_wasserstein_distance(self._real, fake)["mean"]
        row = {"step": step, "swd": swd, "images": len(self._real)}
        _append_jsonl(self.trainer.run_dir / "quality.jsonl", row)
        if self.best is None or swd < self.best["swd"]:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.folder / BEST, data)
            record_checksum(self.folder / BEST, data)
            atomic_write_json(self.folder / "best.json", row)
            self.best = row
        return row


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Train until `cfg.steps`; with `resume`, continue from the run's newest checkpoint.

    Under torchrun (WORLD_SIZE > 1) this is one data-parallel process; it joins and leaves
    the process group itself.
    """
    world = world_from_env()
    joined = world.distributed and not dist.is_initialized()
    if joined:
        init_process_group(world, device_for(world, cfg.device))
    try:
        return _train(cfg, world, resume, progress)
    finally:
        if joined:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, world: World, resume: bool, progress: bool | None) -> dict[str, Any]:
    trainer = Trainer(cfg, world)
    run_dir = trainer.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"--resume given but {run_dir} has no checkpoints")
        trainer.load(ckpts[-1])
        if world.main:
            _trim_jsonl(metrics_path, trainer.step)
            _trim_jsonl(run_dir / "quality.jsonl", trainer.step)
        log.info("resumed %s at step %d", run_dir, trainer.step)
    elif list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass resume, or choose another run name")
    elif cfg.init_from is not None:
        trainer.warm_start(Path(cfg.init_from))
        log.info("warm-started %s from %s", run_dir, cfg.init_from)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    elif trainer.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch_at, total = _open_data(trainer)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True) + "\n")
    log.info(
        "training on %s x%d: %s; batch %d per process (global %d), lr %g",
        trainer.device,
        world.size,
        trainer.options.describe(),
        cfg.batch_size,
        cfg.batch_size * world.size,
        trainer.lr,
    )
    good = encode_checkpoint(trainer.state())  # where a NaN rolls back to: the resumed or initial state
    best = BestKeeper(trainer) if world.main else None
    monitor = Monitor(run_dir, tensorboard=cfg.tensorboard, progress=progress, start=trainer.step, total=cfg.steps)
    if not world.main:
        monitor.close()
        monitor = None
    rollbacks = 0
    t_start = time.perf_counter()
    t_log, step_log = t_start, trainer.step
    last: dict[str, float] = {}
    try:
        while trainer.step < cfg.steps:
            trainer.runner(batch_at(trainer.step), trainer.noise(trainer.step))
            trainer.step += 1
            step = trainer.step
            if monitor:
                monitor.advance()
            at_log = step % cfg.log_every == 0 or step == cfg.steps
            at_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if not (at_log or at_ckpt or step % cfg.sample_every == 0):
                continue
            stats = (all_mean(trainer.acc, world) / (step - step_log)).tolist()
            if not (all(math.isfinite(v) for v in stats) and trainer.weights_finite()):
                rollbacks += 1
                bad = dict(zip(METRICS, stats, strict=True))
                if cfg.on_nan == "stop" or rollbacks > cfg.max_rollbacks:
                    raise TrainingDiverged(
                        f"non-finite loss or weights at step {step} ({bad}) after {rollbacks - 1} rollbacks; "
                        "the last checkpoint is intact: resume from it with a lower --lr"
                    )
                trainer.load_state(decode_checkpoint(good, "the last good checkpoint"), "the last good checkpoint")
                lr = trainer.scale_lr(cfg.nan_lr_factor)
                log.warning(
                    "non-finite values at step %d (%s): rolled back to step %d, lr now %g (rollback %d of %d)",
                    step,
                    bad,
                    trainer.step,
                    lr,
                    rollbacks,
                    cfg.max_rollbacks,
                )
                trainer.acc.zero_()
                t_log, step_log = time.perf_counter(), trainer.step
                if world.main:
                    _trim_jsonl(metrics_path, trainer.step)
                    _trim_jsonl(run_dir / "quality.jsonl", trainer.step)
                    monitor.rewind(trainer.step)
                continue
            if at_log:
                now = time.perf_counter()
                rate = (step - step_log) * cfg.batch_size * world.size / (now - t_log)
                last = {**dict(zip(METRICS, stats, strict=True)), "img_per_s": rate, "lr": trainer.lr}
                trainer.acc.zero_()
                t_log, step_log = now, step
                if world.main:
                    _append_jsonl(metrics_path, {"step": step, **last, "time": time.time()})
                    monitor.scalars(step, last)
                    eta = (cfg.steps - step) * cfg.batch_size * world.size / rate
                    log.info(
                        "step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  %.0f img/s  eta %.0fs",
                        *(step, cfg.steps, last["loss_d"], last["loss_g"], last["d_x"], last["d_g_z1"], rate, eta),
                    )
            t_extra = time.perf_counter()  # samples, checkpoints and SWD do not count against img/s
            if world.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                grid = trainer.sample_grid()
                path = run_dir / "samples" / f"step-{step:08d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image(grid, path)
                monitor.samples(step, grid)
            if at_ckpt:
                good = encode_checkpoint(trainer.state())
                if world.main:
                    write_checkpoint(good, run_dir, step, cfg.keep_checkpoints)
                    quality = best.update(step, good)
                    if quality:
                        monitor.quality(step, quality["swd"])
            t_log += time.perf_counter() - t_extra
        in_sync = replicas_in_sync([trainer.G, trainer.D], world)
        if not in_sync:
            raise RuntimeError("data-parallel replicas hold different weights at the end of training")
    finally:
        if monitor:
            monitor.close()
    samples = sorted((run_dir / "samples").glob("step-*.png"))
    ckpts = list_checkpoints(run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": trainer.step,
        "images": total,
        "seconds": time.perf_counter() - t_start,
        "final": last,
        "samples": str(samples[-1]) if samples else None,
        "checkpoint": str(ckpts[-1]) if ckpts else None,
        "best": best.best if best else None,
        "rollbacks": rollbacks,
        "step_path": trainer.options.describe(),
        "device": str(trainer.device),
        "world_size": world.size,
    }
