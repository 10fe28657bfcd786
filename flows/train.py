"""Training flow: one DCGAN run on the work directory's shards, with a report at the end."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from dcgan.launch import torchrun_command
from dcgan.train import TrainConfig, train
from flows.reports import publish, table


def run_dir_for(work: str, run: str | None, resume: bool) -> Path:
    """The named run, the newest run when resuming, or a new timestamped run."""
    runs = Path(work) / "train"
    if run:
        return runs / run
    if resume:
        existing = sorted((p for p in runs.glob("*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
        if not existing:
            raise ValueError(f"nothing to resume: no runs with checkpoints under {runs}")
        return existing[-1]
    return runs / time.strftime("run-%Y%m%d-%H%M%S")


def _torchrun(cfg: TrainConfig, resume: bool, nproc_per_node: int) -> dict:
    """Train data-parallel on this node: torchrun starts one process per GPU (or CPU rank)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "launch.json"
    config.write_text(json.dumps(cfg.__dict__, indent=2, sort_keys=True) + "\n")
    (run_dir / "result.json").unlink(missing_ok=True)
    cmd = torchrun_command(config, nproc_per_node, resume=resume)
    logger = get_run_logger()
    logger.info("launching %s", " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # every rank's log, live in the flow run's logs
            logger.info(line.rstrip())
            tail = [*tail[-14:], line.rstrip()]
    if proc.returncode != 0 or not (run_dir / "result.json").exists():
        detail = "\n".join(tail)
        raise RuntimeError(f"torchrun training failed with exit status {proc.returncode}:\n{detail}")
    return json.loads((run_dir / "result.json").read_text())


@task
def train_dcgan(config: dict, resume: bool, nproc_per_node: int = 1) -> dict:
    cfg = TrainConfig(**config)
    result = _torchrun(cfg, resume, nproc_per_node) if nproc_per_node > 1 else train(cfg, resume=resume)
    final = result["final"]
    best = result.get("best")
    md = f"# Training: {Path(cfg.run_dir).name}\n\n" + table(
        [
            ("steps", result["steps"]),
            ("images in dataset", result["images"]),
            ("resolution", cfg.resolution),
            ("batch size (per process x processes)", f"{cfg.batch_size} x {result['world_size']}"),
            ("device", result["device"]),
            ("step", result["step_path"]),
            ("seconds", f"{result['seconds']:.0f}"),
            ("NaN rollbacks", result["rollbacks"]),
            ("best checkpoint (lowest SWD)", f"step {best['step']}, SWD {best['swd']:.1f}" if best else "off"),
            *[(k, f"{v:.3g}" if k != "img_per_s" else f"{v:.0f}") for k, v in final.items()],
        ],
        ("", "value"),
    )
    md += f"\nCheckpoint: `{result['checkpoint']}`; TensorBoard: `tensorboard --logdir {cfg.run_dir}/tensorboard`\n"
    image = Path(result["samples"]).read_bytes() if result["samples"] else None
    publish(Path(cfg.shards).parent, f"train-{Path(cfg.run_dir).name}", md, image)
    return result


@flow(name="train")
def train_flow(
    work: str,
    steps: int = 1000,
    resolution: int = 64,
    batch_size: int = 128,
    device: str = "auto",
    run: str | None = None,
    resume: bool = False,
    seed: int = 0,
    lr: float = 2e-4,
    beta1: float = 0.5,
    nz: int = 100,
    ngf: int = 64,
    ndf: int = 64,
    discriminator: str = "dcgan",
    noise: str = "uniform",
    sample_every: int = 500,
    checkpoint_every: int = 500,
    log_every: int = 50,
    loop: str = "fast",
    precision: str = "bf16",
    channels_last: bool = True,
    fused_adam: bool = True,
    cuda_graphs: bool = True,
    gpu_cache: bool = True,
    cache_gb: float = 8.0,
    workers: int = 2,
    best_images: int = 512,
    on_nan: str = "rollback",
    tensorboard: bool = True,
    nproc_per_node: int = 1,
) -> dict:
    """Train a DCGAN on `work/shards` into `work/train/<run>/` (new run, or resume the newest).

    `nproc_per_node` > 1 trains data-parallel under torchrun (one process per GPU; batch_size
    is per process). The fast-path flags apply on CUDA; `loop=textbook` is pytorch/examples'.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    run_dir = run_dir_for(work, run, resume)
    config = TrainConfig(
        shards=str(Path(work) / "shards"),
        run_dir=str(run_dir),
        steps=steps,
        resolution=resolution,
        batch_size=batch_size,
        device=device,
        seed=seed,
        lr=lr,
        beta1=beta1,
        nz=nz,
        ngf=ngf,
        ndf=ndf,
        discriminator=discriminator,
        noise=noise,
        sample_every=sample_every,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        loop=loop,
        precision=precision,
        channels_last=channels_last,
        fused_adam=fused_adam,
        cuda_graphs=cuda_graphs,
        gpu_cache=gpu_cache,
        cache_bytes=int(cache_gb * (1 << 30)),
        workers=workers,
        best_images=best_images,
        on_nan=on_nan,
        tensorboard=tensorboard,
    )
    config.validate()
    return train_dcgan(config.__dict__, resume, nproc_per_node)
