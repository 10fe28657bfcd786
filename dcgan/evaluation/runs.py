"""Load the models of a training run for evaluation."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dcgan.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from dcgan.models import Generator, build_discriminator


def load_run(run_dir: Path, checkpoint: Path | None = None) -> tuple[dict, nn.Module, nn.Module, int]:
    """(training config, G, D, step) from the newest (or the given) checkpoint of a run."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"{run_dir} holds no checkpoints (expected {run_dir}/checkpoints/step-*.pt)")
        checkpoint = ckpts[-1]
    state = load_checkpoint(checkpoint)
    cfg = state.get("config", {})
    try:
        G = Generator(cfg["resolution"], cfg["nz"], cfg["ngf"])
        D = build_discriminator(cfg.get("discriminator", "dcgan"), cfg["resolution"], cfg["ndf"])
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint} does not hold a model this version can build: {exc}") from exc
    return cfg, G.eval(), D.eval(), int(state["step"])
