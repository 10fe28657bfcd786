"""Load the models of a training run for evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dcgan.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from dcgan.models import Generator, build_discriminator
from dcgan.train import ARCH_FIELDS, TrainConfig


def resolve_checkpoint(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """The checkpoint `load_run` reads: the given one (which must exist), else the run's newest."""
    if checkpoint is None:
        ckpts = list_checkpoints(Path(run_dir))
        if not ckpts:
            raise CheckpointError(f"{run_dir} holds no checkpoints (expected {run_dir}/checkpoints/step-*.pt)")
        return ckpts[-1]
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    return Path(checkpoint)


def load_run(run_dir: Path, checkpoint: Path | None = None) -> tuple[dict, nn.Module, nn.Module, int]:
    """(training config, G, D, step) from the newest (or the given) checkpoint of a run.

    A given checkpoint must be a model of the run: the same resolution, widths, noise and
    discriminator as the run's config.json, since samples are compared with the run's images.
    """
    run_dir = Path(run_dir)
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    state = load_checkpoint(checkpoint)
    cfg = state.get("config", {})
    run_config = run_dir / "config.json"
    if run_config.is_file():
        expected = json.loads(run_config.read_text())
        default = {k: getattr(TrainConfig, k, None) for k in ARCH_FIELDS}  # older files lack newer fields
        clash = [
            f"{k} {cfg.get(k, default[k])} (run: {expected.get(k, default[k])})"
            for k in ARCH_FIELDS
            if cfg.get(k, default[k]) != expected.get(k, default[k])
        ]
        if clash:
            raise CheckpointError(f"{checkpoint} is not a model of run {run_dir.name}: {', '.join(clash)}")
    try:
        G = Generator(cfg["resolution"], cfg["nz"], cfg["ngf"])
        D = build_discriminator(cfg.get("discriminator", "dcgan"), cfg["resolution"], cfg["ndf"])
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint} does not hold a model this version can build: {exc}") from exc
    return cfg, G.eval(), D.eval(), int(state["step"])
