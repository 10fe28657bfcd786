"""Evaluation flow: sample quality, the paper's visualisations and protocols on a training run, with a report."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from prefect import flow, task
from torch import nn

from dcgan.checkpoint import eval_dir_for
from dcgan.evaluation.arithmetic import parse_arithmetic, vector_arithmetic
from dcgan.evaluation.cifar import cifar10_protocol, seeded
from dcgan.evaluation.feature_removal import before_after_grid, feature_map_removal, load_boxes
from dcgan.evaluation.features import extract_features
from dcgan.evaluation.fid import frechet_distance, kernel_inception_distance
from dcgan.evaluation.guided_backprop import trained_vs_random
from dcgan.evaluation.inception import load_inception, pool3_features
from dcgan.evaluation.inputs import check_inputs
from dcgan.evaluation.memorisation import memorisation_check
from dcgan.evaluation.quality import (
    generate,
    latent_walks,
    real_and_generated,
    real_images,
    sliced_wasserstein_distance,
)
from dcgan.evaluation.report import render_report
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.sample_sheet import SHEET_SEED, SHEET_SIZE, numbered_sheet, sheet_noise
from dcgan.evaluation.svhn import load_svhn_mat, svhn_protocol
from dcgan.settings import EvaluateSettings
from dcgan.train import resolve_device
from flows.reports import create_report_artifact, publish, report_key
from preprocessing.atomic import atomic_write_bytes, atomic_write_json
from preprocessing.preview import tile

RANDOM_D_SEED = 12345


def _checkpoint(checkpoint: str | None) -> Path | None:
    return Path(checkpoint) if checkpoint else None


# The run being evaluated, loaded once per evaluation flow run (by check_inputs). The tasks receive
# paths (the run directory and the checkpoint check_inputs resolved), never the models, as DESIGN
# asks of data between tasks: each task gets its models from here, as copies, so no task sees
# another's changes (a D moved to the GPU, a copy re-seeded). An entry lives while a flow run that
# loaded it runs (`_loaded_once`), then the memory is freed; the key holds the checkpoint's size
# and mtime, so a checkpoint replaced meanwhile is read again, never served stale.
Loaded = tuple[dict, nn.Module, nn.Module, int]
_LOADED: dict[tuple, list] = {}  # key -> [(cfg, G, D, step), flow runs holding it]
_LOADED_LOCK = threading.Lock()


def _run_key(run: str, checkpoint: str) -> tuple:
    st = Path(checkpoint).stat()
    return str(Path(run).resolve()), str(Path(checkpoint).resolve()), st.st_mtime_ns, st.st_size


@contextmanager
def _loaded_once(run: str, checkpoint: str, loaded: Loaded) -> Iterator[None]:
    """Hand `loaded` (load_run's result for `checkpoint`) to the tasks of this flow run while it runs."""
    key = _run_key(run, checkpoint)
    with _LOADED_LOCK:
        entry = _LOADED.setdefault(key, [loaded, 0])  # an evaluation of the same file already running: share
        entry[1] += 1
    try:
        yield
    finally:
        with _LOADED_LOCK:
            entry[1] -= 1
            if entry[1] == 0 and _LOADED.get(key) is entry:
                del _LOADED[key]


def run_models(run: str, checkpoint: str) -> Loaded:
    """(config, G, D, step) of `run` at `checkpoint`: copies of the flow run's loaded models.

    A task run outside an evaluation flow run (or after the checkpoint changed) loads it itself.
    """
    with _LOADED_LOCK:
        entry = _LOADED.get(_run_key(run, checkpoint))
    if entry is None:
        return load_run(Path(run), Path(checkpoint))
    cfg, G, D, step = entry[0]
    return copy.deepcopy(cfg), copy.deepcopy(G), copy.deepcopy(D), step


def _save_figure(out: str, name: str, rgb: np.ndarray) -> None:
    figures = Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding of {name} failed")
    atomic_write_bytes(figures / f"{name}.png", png.tobytes())


@task
def cifar10_task(run: str, checkpoint: str, settings: EvaluateSettings, device: str) -> dict:
    cfg, _, D, step = run_models(run, checkpoint)
    random_d = seeded(copy.deepcopy(D), seed=RANDOM_D_SEED)
    results = cifar10_protocol(
        D,
        random_d,
        Path(settings.cifar10),
        cfg["resolution"],
        limit_train=settings.limit_train,
        limit_test=settings.limit_test,
        device=device,
        c_grid=settings.c_grid(),
        grid_extensions=settings.svm_grid_extensions,
        precision=settings.precision,
    )
    return {
        "step": step,
        "resolution": cfg["resolution"],
        "discriminator": cfg.get("discriminator", "dcgan"),
        "cifar10": results,
    }


@task
def samples_task(run: str, checkpoint: str, out: str, n: int) -> dict:
    """SWD between generated and training images, memorisation, plus sample and latent-walk grids."""
    cfg, G, D, step = run_models(run, checkpoint)
    real, fake = real_and_generated(G, cfg, n)
    held = max(1, len(real) // 8)
    memo, neighbours = memorisation_check(fake[:256], real[held:], real[:held], D)
    grids = (
        ("samples", fake[:64], 8),
        ("latent_walks", latent_walks(G, cfg["nz"], noise=cfg.get("noise", "uniform")), 10),
        ("memorisation", neighbours, 4),
    )
    for name, images, cols in grids:
        _save_figure(out, name, tile(list(images), columns=cols))
    return {
        "step": step,
        "swd": sliced_wasserstein_distance(real, fake),
        "images": len(real),
        "memorisation": memo,
        "reference_images": len(real) - held,
    }


@task
def sample_sheet_task(run: str, checkpoint: str, out: str) -> dict:
    """The numbered sheet users pick arithmetic exemplars and draw boxes on, and its z's."""
    cfg, G, _, _ = run_models(run, checkpoint)
    z = sheet_noise(cfg)
    _save_figure(out, "sample_sheet", numbered_sheet(generate(G, z)))
    z_path = Path(out) / "sample_sheet_z.npy"
    np.save(z_path, z.numpy())
    return {"samples": SHEET_SIZE, "seed": SHEET_SEED, "z": str(z_path), "figure": "figures/sample_sheet.png"}


@task
def fid_task(run: str, checkpoint: str, inception: str, n: int, device: str) -> dict:
    """FID and KID between generated and training images, on the user's Inception weights."""
    cfg, G, _, _ = run_models(run, checkpoint)
    real, fake = real_and_generated(G, cfg, n)
    net = load_inception(Path(inception))
    f_real, f_fake = pool3_features(net, real, device=device), pool3_features(net, fake, device=device)
    return {
        "network": net.network,
        "weights": net.path,
        "sha256": net.sha256,
        "images": len(real),
        "fid": frechet_distance(f_real, f_fake),
        "kid": kernel_inception_distance(f_real, f_fake),
    }


@task
def guided_backprop_task(run: str, checkpoint: str, out: str, n: int) -> dict:
    """Guided backprop of the top features of the trained D and of a random D, on training images."""
    cfg, _, D, _ = run_models(run, checkpoint)
    images = real_images(cfg["shards"], n, seed=1)
    figure, summary = trained_vs_random(D, seeded(copy.deepcopy(D), seed=RANDOM_D_SEED), images)
    _save_figure(out, "guided_backprop", figure)
    return summary


@task
def arithmetic_task(run: str, checkpoint: str, out: str, concepts: str, expression: str) -> dict:
    cfg, G, _, _ = run_models(run, checkpoint)
    figure, summary = vector_arithmetic(G, sheet_noise(cfg), parse_arithmetic(concepts, expression, SHEET_SIZE))
    _save_figure(out, "vector_arithmetic", figure)
    return summary


@task
def removal_task(run: str, checkpoint: str, out: str, boxes: str) -> dict:
    cfg, G, _, _ = run_models(run, checkpoint)
    parsed = load_boxes(Path(boxes), cfg["resolution"], SHEET_SIZE)
    images, summary = feature_map_removal(G, sheet_noise(cfg), parsed, cfg["resolution"])
    _save_figure(out, "feature_removal", before_after_grid(images, summary["annotated_samples"]))
    return summary


@task
def svhn_task(run: str, checkpoint: str, settings: EvaluateSettings, device: str) -> dict:
    _, _, D, _ = run_models(run, checkpoint)
    train = load_svhn_mat(Path(settings.svhn) / "train_32x32.mat")
    test = load_svhn_mat(Path(settings.svhn) / "test_32x32.mat")
    return svhn_protocol(
        lambda x, label: extract_features(D, x, device=device, progress=label, precision=settings.precision),
        train,
        test,
        draws=settings.svhn_draws,
        c_grid=settings.c_grid(),
        grid_extensions=settings.svm_grid_extensions,
        device=device,
        precision=settings.precision,
    )


@task
def write_report(run: str, out: str, metrics: dict) -> str:
    """<out>/report.md and metrics.json, the stage report, and the full report as a Prefect artifact."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "metrics.json", metrics)
    md = render_report(folder.name, metrics)
    atomic_write_bytes(folder / "report.md", md.encode())
    # The stage report carries the latent walks inline instead of the figure links; the artifact
    # `eval-<run>-report` is the whole report with every figure inline.
    summary = "\n".join(line for line in md.splitlines() if "](figures/" not in line)
    latent_walks = (folder / "figures" / "latent_walks.png").read_bytes()
    publish(Path(run).parent.parent, f"eval-{folder.name}", summary, latent_walks)
    key = report_key(f"eval-{folder.name}-report")
    create_report_artifact(md, folder, key=key, description="dcgan-pipeline: full evaluation report")
    return str(folder)


@flow(name="evaluate")
def evaluate_flow(
    run: str,
    settings: EvaluateSettings = EvaluateSettings(),
    checkpoint: str | None = None,
    boxes: str | None = None,
) -> dict:
    """Evaluate a training run directory (`<work>/train/<run>`), its newest checkpoint unless one is given.

    Always: SWD, sample and latent-walk grids, memorisation, the numbered sample sheet and
    guided backpropagation. With their inputs: FID/KID (`settings.inception`: a local weights
    file), the CIFAR-10 and SVHN protocols, and, picked on the sample sheet of an earlier
    evaluation, vector arithmetic (`settings.arithmetic` + `settings.expression`) and feature-map removal
    (`boxes`). Every input is checked before anything is written. The run is read from disk once,
    by that check; the tasks receive its directory and the checkpoint it resolved (see `run_models`).
    Writes `<work>/eval/<run>`, or for an earlier checkpoint `<work>/eval/<run>@<stem>` (`eval_dir_for`).
    """
    checked = check_inputs(  # loads the run: the evaluation's one load_run
        Path(run),
        settings,
        checkpoint=_checkpoint(checkpoint),
        boxes=Path(boxes) if boxes else None,
    )
    ckpt = str(checked.checkpoint)  # every task evaluates this one, even if a newer one appears meanwhile
    out = str(eval_dir_for(Path(run), checked.checkpoint if checkpoint else None))
    with _loaded_once(run, ckpt, checked.loaded):
        device = str(resolve_device(settings.device))
        s = settings
        metrics: dict = {"samples": samples_task(run, ckpt, out, s.swd_images)}
        metrics["step"] = metrics["samples"].pop("step")
        metrics["sample_sheet"] = sample_sheet_task(run, ckpt, out)
        metrics["guided_backprop"] = guided_backprop_task(run, ckpt, out, s.guided_images)
        if s.inception is not None:
            metrics["fid"] = fid_task(run, ckpt, s.inception, s.swd_images, device)
        if s.arithmetic is not None:
            metrics["arithmetic"] = arithmetic_task(run, ckpt, out, s.arithmetic, s.expression)
        if boxes is not None:
            metrics["feature_removal"] = removal_task(run, ckpt, out, boxes)
        if s.cifar10 is not None:
            metrics.update(cifar10_task(run, ckpt, s, device))
        if s.svhn is not None:
            metrics["svhn"] = svhn_task(run, ckpt, s, device)
    return {**metrics, "eval_dir": write_report(run, out, metrics)}
