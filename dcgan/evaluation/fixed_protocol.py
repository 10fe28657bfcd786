"""The fixed comparison protocol of the model registry: every run measured on the same images and z's.

A run's own evaluation compares it with its own training shards, so two runs trained on
different dataset versions are measured against different images. Here the reference is
drawn with a fixed seed from one given shard directory, and the samples come from fixed
z's, whatever the run: champion and challenger measured on the same shards see exactly the
same reference images (identified by their sha256 in `protocol`) and, at equal nz and prior,
the same z's. The seeds are the evaluation's (`real_and_generated`), so on a run's own
shards the SWD equals the evaluation report's at the same image count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dcgan.checkpoint import list_checkpoints
from dcgan.evaluation.cifar import EvaluationError
from dcgan.evaluation.fid import frechet_distance, kernel_inception_distance
from dcgan.evaluation.figures import side_by_side, titled
from dcgan.evaluation.inception import load_inception, pool3_features
from dcgan.evaluation.memorisation import memorisation_check
from dcgan.evaluation.quality import generate, prior_noise, real_images, sliced_wasserstein_distance
from dcgan.evaluation.runs import load_run
from preprocessing.preview import tile
from preprocessing.sharding import read_index

PROTOCOL = "fixed-v1"
REFERENCE_SEED = 0
Z_SEED = 7
MEMORISATION_SAMPLES = 256


def _resolve(run_dir: Path, checkpoint: Path | None) -> Path | None:
    """The checkpoint load_run will use, so the metrics can name it (None: load_run reports the error)."""
    if checkpoint is not None:
        return Path(checkpoint)
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def fixed_protocol(
    run_dir: Path,
    shards: Path,
    n_images: int = 1024,
    inception: Path | None = None,
    device: str = "cpu",
    checkpoint: Path | None = None,
) -> dict:
    """SWD, pixel-space memorisation ratio, and FID/KID with `inception`, of one run on the fixed protocol.

    `shards` holds the reference images (the same directory for every run compared); the
    `protocol` entry identifies what was measured, and only results with equal `protocol`
    compare. SWD needs equal counts, so fewer shard images than `n_images` lower the count.
    """
    if n_images < 2:
        raise EvaluationError(f"the fixed protocol needs n_images >= 2, got {n_images}")
    ckpt = _resolve(Path(run_dir), checkpoint)
    cfg, G, D, step = load_run(Path(run_dir), ckpt)
    index = read_index(Path(shards))
    if index.get("resolution") != cfg["resolution"]:
        raise EvaluationError(
            f"reference shards {shards} are {index.get('resolution')} px but run {Path(run_dir).name} makes "
            f"{cfg['resolution']} px images"
        )
    net = load_inception(Path(inception)) if inception is not None else None  # a bad file fails before the work
    real = real_images(str(shards), n_images, seed=REFERENCE_SEED)
    if len(real) < 2:
        raise EvaluationError(f"reference shards {shards} hold {len(real)} image(s); the protocol needs at least 2")
    fake = generate(G.to(device), prior_noise(cfg["nz"], cfg.get("noise", "uniform"), len(real), Z_SEED))
    held = max(1, len(real) // 8)
    memo, _ = memorisation_check(fake[:MEMORISATION_SAMPLES], real[held:], real[:held], D)
    swd = sliced_wasserstein_distance(real, fake)
    protocol = {
        "name": PROTOCOL,
        "images": len(real),
        "reference_sha256": hashlib.sha256(real.tobytes()).hexdigest(),
        "reference_seed": REFERENCE_SEED,
        "z_seed": Z_SEED,
        "inception_sha256": net.sha256 if net else None,
    }
    metrics = {
        "protocol": protocol,
        "checkpoint": str(ckpt),
        "step": step,
        "swd": swd["mean"],
        "swd_levels": {k: v for k, v in swd.items() if k != "mean"},
        "memorisation_ratio": memo["pixels"]["ratio_of_medians"],
    }
    if net is not None:
        f_real, f_fake = pool3_features(net, real, device=device), pool3_features(net, fake, device=device)
        kid = kernel_inception_distance(f_real, f_fake)
        metrics |= {"fid": frechet_distance(f_real, f_fake), "kid": kid["mean"], "kid_std": kid["std"]}
    return metrics


def comparison_figure(
    left: Path,
    right: Path,
    *,
    titles: tuple[str, str] = ("champion", "challenger"),
    checkpoints: tuple[Path | None, Path | None] = (None, None),
    n: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Two runs' sample grids side by side (RGB uint8), drawn from the protocol's fixed z's.

    At equal nz and prior both grids come from the same z's, so tile i of one is the other
    run's answer to the same z.
    """
    grids = []
    for run_dir, ckpt, title in zip((left, right), checkpoints, titles, strict=True):
        cfg, G, _, step = load_run(Path(run_dir), ckpt)
        images = generate(G.to(device), prior_noise(cfg["nz"], cfg.get("noise", "uniform"), n, Z_SEED))
        grids.append(titled(tile(list(images)), f"{title}: {Path(run_dir).name} step {step}"))
    return side_by_side(*grids)
