"""Evaluation flow: the paper's CIFAR-10 protocol on a training run, with a report."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import torch
from prefect import flow, task

from dcgan.evaluation.cifar import cifar10_protocol, seeded
from dcgan.evaluation.features import extract_features
from dcgan.evaluation.memorisation import memorisation_check
from dcgan.evaluation.quality import generate, latent_walks, real_images, sliced_wasserstein_distance
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.svhn import load_svhn_mat, svhn_protocol
from flows.reports import publish, table
from preprocessing.preview import tile
from preprocessing.tar_shards import atomic_write_json


def eval_dir_for(run_dir: Path) -> Path:
    """`<work>/train/<run>` -> `<work>/eval/<run>`."""
    return run_dir.parent.parent / "eval" / run_dir.name


@task
def cifar10_task(run: str, cifar10: str, limit_train: int | None, limit_test: int | None, device: str) -> dict:
    cfg, _, D, step = load_run(Path(run))
    random_d = seeded(copy.deepcopy(D), seed=12345)
    results = cifar10_protocol(
        D, random_d, Path(cifar10), cfg["resolution"], limit_train=limit_train, limit_test=limit_test, device=device
    )
    return {
        "step": step,
        "resolution": cfg["resolution"],
        "discriminator": cfg.get("discriminator", "dcgan"),
        "cifar10": results,
    }


@task
def samples_task(run: str, n: int) -> dict:
    """SWD between generated and training images, plus sample and latent-walk grids."""
    cfg, G, D, step = load_run(Path(run))
    real = real_images(cfg["shards"], n)
    z = torch.Generator().manual_seed(7)
    noise = (
        torch.rand(len(real), cfg["nz"], generator=z) * 2 - 1
        if cfg.get("noise", "uniform") == "uniform"
        else (torch.randn(len(real), cfg["nz"], generator=z))
    )
    fake = generate(G, noise)
    held = max(1, len(real) // 8)
    memo, neighbours = memorisation_check(fake[:256], real[held:], real[:held], D)
    figures = eval_dir_for(Path(run)) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    grids = (
        ("samples", fake[:64], 8),
        ("latent_walks", latent_walks(G, cfg["nz"]), 10),
        ("memorisation", neighbours, 4),
    )
    for name, images, cols in grids:
        cv2.imwrite(str(figures / f"{name}.png"), cv2.cvtColor(tile(list(images), columns=cols), cv2.COLOR_RGB2BGR))
    return {
        "step": step,
        "swd": sliced_wasserstein_distance(real, fake),
        "images": len(real),
        "memorisation": memo,
        "reference_images": len(real) - held,
    }


@task
def svhn_task(run: str, svhn: str, draws: int, device: str) -> dict:
    cfg, _, D, _ = load_run(Path(run))
    if cfg["resolution"] != 32:
        raise ValueError(f"the SVHN protocol needs a 32 px discriminator; this run is {cfg['resolution']} px")
    train = load_svhn_mat(Path(svhn) / "train_32x32.mat")
    test = load_svhn_mat(Path(svhn) / "test_32x32.mat")
    return svhn_protocol(lambda x: extract_features(D, x, device=device), train, test, draws=draws)


@task
def write_report(run: str, metrics: dict) -> str:
    out = eval_dir_for(Path(run))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    md = f"# Evaluation: {Path(run).name} (step {metrics['step']})\n\n"
    q = metrics["samples"]
    md += (
        "## Samples\n\nSliced Wasserstein distance x 1e3 (Karras et al. 2018) between "
        f"{q['images']} generated and {q['images']} training images, per Laplacian-pyramid level (lower is "
        "better):\n\n"
    )
    md += table([(k, f"{v:.1f}") for k, v in q["swd"].items()], ("level", "SWD"))
    md += "\n![samples](figures/samples.png)\n\nLatent walks (paper 6.1): each row interpolates linearly in Z.\n"
    md += "\n![latent walks](figures/latent_walks.png)\n\n"
    rows = [
        (space, f"{m['samples']['median']:.3f}", f"{m['held_out']['median']:.3f}", f"{m['ratio_of_medians']:.2f}")
        for space, m in q["memorisation"].items()
    ]
    md += (
        "## Memorisation\n\nDistance from generated samples, and from real images held out of the reference "
        f"set, to their nearest of {q['reference_images']} training images (a ratio well below 1 suggests copies). "
        "Each row of the figure: a sample, then its 3 nearest training images in pixel space.\n\n"
    )
    md += table(rows, ("space", "samples: median NN distance", "held-out real: median", "ratio"))
    md += "\n![memorisation](figures/memorisation.png)\n\n"
    if "cifar10" in metrics:
        rows = [
            (name, f"{r['test_accuracy'] * 100:.2f}%", r["feature_dim"], f"{r['C']:g}", r["n_train"], r["n_test"])
            for name, r in metrics["cifar10"].items()
        ]
        md += (
            "## CIFAR-10: discriminator features + linear L2-SVM (paper section 5.1)\n\n"
            "Every conv layer of D max-pooled to 4x4 and concatenated; squared-hinge L2-SVM with C chosen on a "
            "10% validation split of the training images. The paper reports 82.8% (D trained on ImageNet-1k).\n\n"
        )
        md += table(rows, ("features", "test accuracy", "dim", "C", "train images", "test images"))
    if "svhn" in metrics:
        r = metrics["svhn"]
        md += (
            "\n## SVHN: 1000 labels, L2-SVM on D features (paper section 5.2)\n\n"
            f"Test error {r['test_error_mean'] * 100:.2f}% +- {r['test_error_std'] * 100:.2f}% over {r['draws']} "
            f"draws of {r['labelled']} labelled images (C={r['C']:g}, chosen on {r['n_val']} validation images). "
            "The paper reports 22.48% for DCGAN + L2-SVM.\n"
        )
    (out / "report.md").write_text(md)
    # The stage report and the artifact carry the latent walks inline instead of the figure links.
    summary = "\n".join(line for line in md.splitlines() if "](figures/" not in line)
    publish(
        Path(run).parent.parent, f"eval-{Path(run).name}", summary, (out / "figures" / "latent_walks.png").read_bytes()
    )
    return str(out)


@flow(name="evaluate")
def evaluate_flow(
    run: str,
    cifar10: str | None = None,
    svhn: str | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    svhn_draws: int = 10,
    swd_images: int = 2048,
    device: str = "cpu",
) -> dict:
    """Evaluate the newest checkpoint of a training run directory (`<work>/train/<run>`)."""
    metrics: dict = {"samples": samples_task(run, swd_images)}
    metrics["step"] = metrics["samples"].pop("step")
    if cifar10 is not None:
        metrics.update(cifar10_task(run, cifar10, limit_train, limit_test, device))
    if svhn is not None:
        metrics["svhn"] = svhn_task(run, svhn, svhn_draws, device)
    return {**metrics, "eval_dir": write_report(run, metrics)}
