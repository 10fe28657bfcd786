"""Training flow: one DCGAN run on the work directory's shards, with a report at the end."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task

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


@task
def train_dcgan(config: dict, resume: bool) -> dict:
    cfg = TrainConfig(**config)
    result = train(cfg, resume=resume)
    final = result["final"]
    md = f"# Training: {Path(cfg.run_dir).name}\n\n" + table(
        [
            ("steps", result["steps"]),
            ("images in dataset", result["images"]),
            ("resolution", cfg.resolution),
            ("batch size", cfg.batch_size),
            ("seconds", f"{result['seconds']:.0f}"),
            *[(k, f"{v:.3f}" if k != "img_per_s" else f"{v:.0f}") for k, v in final.items()],
        ],
        ("", "value"),
    )
    md += f"\nCheckpoint: `{result['checkpoint']}`\n"
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
) -> dict:
    """Train a DCGAN on `work/shards` into `work/train/<run>/` (new run, or resume the newest)."""
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
    )
    config.validate()
    return train_dcgan(config.__dict__, resume)
