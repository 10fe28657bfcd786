"""The DCGAN training loop with the paper's hyper-parameters and exact resume.

Defaults follow Radford et al. (2015): Adam(lr 2e-4, beta1 0.5), batch 128, z of 100
dimensions drawn uniformly from [-1, 1], N(0, 0.02) initialisation. Each step draws its
batch and noise from generators seeded by (seed, step), so training is a pure function of
the config and the data; a checkpoint plus the step replays the rest of the run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from dcgan.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from dcgan.data import CachedImages, DataError, shard_urls, stream_batches, to_unit_range
from dcgan.models import DISCRIMINATORS, RESOLUTIONS, Generator, build_discriminator, init_weights

log = logging.getLogger(__name__)

# Settings that define the model; a checkpoint can only resume a run that agrees on them.
ARCH_FIELDS = ("resolution", "nz", "ngf", "ndf", "noise", "discriminator")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; no checkpoint was written from the poisoned state."""


@dataclass
class TrainConfig:
    shards: str
    run_dir: str
    steps: int = 1000
    resolution: int = 64
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.5
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    noise: str = "uniform"
    discriminator: str = "dcgan"  # or "imagenet32": the paper's 32 px CIFAR-10 feature D
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    cache_bytes: int = 8 << 30
    workers: int = 2
    deterministic: bool = False

    def validate(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        for name in ("steps", "batch_size", "nz", "ngf", "ndf", "log_every", "sample_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1):
            raise ValueError(f"need lr > 0 and 0 <= beta1 < 1, got {self.lr}, {self.beta1}")
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}")
        if self.discriminator == "imagenet32" and self.resolution != 32:
            raise ValueError("the imagenet32 discriminator trains at resolution 32")
        if self.noise not in ("uniform", "normal"):
            raise ValueError(f"noise must be 'uniform' or 'normal', got {self.noise!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def sample_noise(cfg: TrainConfig, n: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg.noise == "uniform":
        z = torch.rand(n, cfg.nz, generator=g) * 2 - 1
    else:
        z = torch.randn(n, cfg.nz, generator=g)
    return z.to(device)


class Trainer:
    """Owns the models, optimizers and run directory of one training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        self.G = Generator(cfg.resolution, cfg.nz, cfg.ngf).to(self.device)
        self.D = build_discriminator(cfg.discriminator, cfg.resolution, cfg.ndf).to(self.device)
        self.G.apply(init_weights)
        self.D.apply(init_weights)
        betas = (cfg.beta1, 0.999)
        self.optG = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas)
        self.optD = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=betas)
        self.fixed_noise = sample_noise(cfg, 64, cfg.seed + 1, self.device)
        self.step = 0

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "config": asdict(self.cfg),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "optG": self.optG.state_dict(),
            "optD": self.optD.state_dict(),
            "fixed_noise": self.fixed_noise.cpu(),
            "rng": rng,
        }

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved = state.get("config", {})
        saved = {k: saved.get(k, getattr(TrainConfig, k, None)) for k in ARCH_FIELDS}  # older files lack new fields
        clash = {k: (saved[k], getattr(self.cfg, k)) for k in ARCH_FIELDS if saved[k] != getattr(self.cfg, k)}
        if clash:
            detail = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in clash.items())
            raise CheckpointError(f"{path} belongs to an incompatible model ({detail})")
        try:
            self.G.load_state_dict(state["G"])
            self.D.load_state_dict(state["D"])
            self.optG.load_state_dict(state["optG"])
            self.optD.load_state_dict(state["optD"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path} does not fit the model: {exc}") from exc
        self.fixed_noise = state["fixed_noise"].to(self.device)
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])

    # -- one step ----------------------------------------------------------------------
    def train_step(self, real: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """One D update on a real and a fake batch, then one G update (pytorch/examples order)."""
        ones = torch.ones(real.shape[0], device=self.device)
        zeros = torch.zeros_like(ones)
        self.optD.zero_grad(set_to_none=True)
        out_real = self.D(real)
        fake = self.G(z)
        out_fake = self.D(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(out_real, ones) + F.binary_cross_entropy_with_logits(
            out_fake, zeros
        )
        loss_d.backward()
        self.optD.step()
        self.optG.zero_grad(set_to_none=True)
        out_g = self.D(fake)
        loss_g = F.binary_cross_entropy_with_logits(out_g, ones)
        loss_g.backward()
        self.optG.step()
        return {
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_x": torch.sigmoid(out_real.detach()).mean(),
            "d_g_z1": torch.sigmoid(out_fake.detach()).mean(),
            "d_g_z2": torch.sigmoid(out_g.detach()).mean(),
        }

    @torch.no_grad()
    def save_samples(self) -> Path:
        """An 8x8 grid from the fixed noise; G's batchnorm buffers are restored afterwards."""
        buffers = {k: v.clone() for k, v in self.G.named_buffers()}
        images = self.G(self.fixed_noise)
        for k, v in self.G.named_buffers():
            v.copy_(buffers[k])
        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float().cpu(), path, nrow=8, normalize=True, value_range=(-1, 1))
        return path


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def _open_data(cfg: TrainConfig, device: torch.device, start_step: int):  # noqa: ANN202
    urls, total = shard_urls(Path(cfg.shards), cfg.resolution)
    if cfg.batch_size > total:
        raise DataError(f"batch size {cfg.batch_size} is larger than the dataset ({total} images)")
    need = total * 3 * cfg.resolution**2
    if need <= cfg.cache_bytes:
        cache = CachedImages(urls, cfg.seed)
        log.info("decoded %d images into a %.1f MB in-memory cache", len(cache), need / 1e6)
        return lambda step: to_unit_range(cache.batch(step, cfg.batch_size), device), total
    log.info("dataset needs %.1f GB > cache budget; streaming from %d shards", need / 1e9, len(urls))
    stream = stream_batches(urls, cfg.batch_size, cfg.seed + start_step, cfg.workers)
    return lambda step: to_unit_range(next(stream), device), total


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train until `cfg.steps`; with `resume`, continue from the run's newest checkpoint."""
    trainer = Trainer(cfg)
    run_dir = trainer.run_dir
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"--resume given but {run_dir} has no checkpoints")
        trainer.load(ckpts[-1])
        _trim_metrics(metrics_path, trainer.step)
        log.info("resumed %s at step %d", run_dir, trainer.step)
    elif list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass resume, or choose another run name")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    batch_at, total = _open_data(cfg, trainer.device, trainer.step)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")

    t_start = time.perf_counter()
    t_log, step_log = t_start, trainer.step
    sums: dict[str, torch.Tensor] = {}
    last: dict[str, float] = {}
    with metrics_path.open("a") as metrics:
        while trainer.step < cfg.steps:
            real = batch_at(trainer.step)
            z = sample_noise(cfg, cfg.batch_size, _step_seed(cfg.seed, trainer.step), trainer.device)
            out = trainer.train_step(real, z)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v
            trainer.step += 1
            step = trainer.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = step - step_log
                last = {k: float(v) / n for k, v in sums.items()}
                sums = {}
                if not all(math.isfinite(v) for v in last.values()):
                    raise TrainingDiverged(
                        f"non-finite loss at step {step} ({last}); the last checkpoint is intact, "
                        "resume from it with a lower learning rate"
                    )
                now = time.perf_counter()
                rate = n * cfg.batch_size / (now - t_log)
                row = {"step": step, **last, "img_per_s": rate, "time": time.time()}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                eta = (cfg.steps - step) * cfg.batch_size / rate
                log.info(
                    "step %d/%d  loss_d %.3f  loss_g %.3f  D(x) %.2f  D(G(z)) %.2f  %.0f img/s  eta %.0fs",
                    step,
                    cfg.steps,
                    last["loss_d"],
                    last["loss_g"],
                    last["d_x"],
                    last["d_g_z1"],
                    rate,
                    eta,
                )
                t_log, step_log = now, step
            if step % cfg.sample_every == 0 or step == cfg.steps:
                trainer.save_samples()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(trainer.state(), run_dir, step, cfg.keep_checkpoints)
    samples = sorted((run_dir / "samples").glob("step-*.png"))
    return {
        "run_dir": str(run_dir),
        "steps": trainer.step,
        "images": total,
        "seconds": time.perf_counter() - t_start,
        "final": last,
        "samples": str(samples[-1]) if samples else None,
        "checkpoint": str(list_checkpoints(run_dir)[-1]) if list_checkpoints(run_dir) else None,
    }


def _step_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + 1) % (1 << 63)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(unknown)}")
    return TrainConfig(**values)
