"""Evaluation flow: sample quality, the paper's visualisations and protocols on a training run, with a report."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import cv2
import numpy as np
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

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
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.sample_sheet import SHEET_SEED, SHEET_SIZE, numbered_sheet, sheet_noise
from dcgan.evaluation.svhn import load_svhn_mat, svhn_protocol
from flows.reports import publish, table
from preprocessing.preview import tile
from preprocessing.tar_shards import atomic_write_bytes, atomic_write_json

RANDOM_D_SEED = 12345


def eval_dir_for(run_dir: Path) -> Path:
    """`<work>/train/<run>` -> `<work>/eval/<run>`."""
    return run_dir.parent.parent / "eval" / run_dir.name


def _checkpoint(checkpoint: str | None) -> Path | None:
    return Path(checkpoint) if checkpoint else None


def _save_figure(run: str, name: str, rgb: np.ndarray) -> None:
    figures = eval_dir_for(Path(run)) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding of {name} failed")
    atomic_write_bytes(figures / f"{name}.png", png.tobytes())


@task
def cifar10_task(
    run: str, checkpoint: str | None, cifar10: str, limit_train: int | None, limit_test: int | None, device: str
) -> dict:
    cfg, _, D, step = load_run(Path(run), _checkpoint(checkpoint))
    random_d = seeded(copy.deepcopy(D), seed=RANDOM_D_SEED)
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
def samples_task(run: str, checkpoint: str | None, n: int) -> dict:
    """SWD between generated and training images, memorisation, plus sample and latent-walk grids."""
    cfg, G, D, step = load_run(Path(run), _checkpoint(checkpoint))
    real, fake = real_and_generated(G, cfg, n)
    held = max(1, len(real) // 8)
    memo, neighbours = memorisation_check(fake[:256], real[held:], real[:held], D)
    grids = (
        ("samples", fake[:64], 8),
        ("latent_walks", latent_walks(G, cfg["nz"], noise=cfg.get("noise", "uniform")), 10),
        ("memorisation", neighbours, 4),
    )
    for name, images, cols in grids:
        _save_figure(run, name, tile(list(images), columns=cols))
    return {
        "step": step,
        "swd": sliced_wasserstein_distance(real, fake),
        "images": len(real),
        "memorisation": memo,
        "reference_images": len(real) - held,
    }


@task
def sample_sheet_task(run: str, checkpoint: str | None) -> dict:
    """The numbered sheet users pick arithmetic exemplars and draw boxes on, and its z's."""
    cfg, G, _, _ = load_run(Path(run), _checkpoint(checkpoint))
    z = sheet_noise(cfg)
    _save_figure(run, "sample_sheet", numbered_sheet(generate(G, z)))
    z_path = eval_dir_for(Path(run)) / "sample_sheet_z.npy"
    np.save(z_path, z.numpy())
    return {"samples": SHEET_SIZE, "seed": SHEET_SEED, "z": str(z_path), "figure": "figures/sample_sheet.png"}


@task
def fid_task(run: str, checkpoint: str | None, inception: str, n: int, device: str) -> dict:
    """FID and KID between generated and training images, on the user's Inception weights."""
    cfg, G, _, _ = load_run(Path(run), _checkpoint(checkpoint))
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
def guided_backprop_task(run: str, checkpoint: str | None, n: int) -> dict:
    """Guided backprop of the top features of the trained D and of a random D, on training images."""
    cfg, _, D, _ = load_run(Path(run), _checkpoint(checkpoint))
    images = real_images(cfg["shards"], n, seed=1)
    figure, summary = trained_vs_random(D, seeded(copy.deepcopy(D), seed=RANDOM_D_SEED), images)
    _save_figure(run, "guided_backprop", figure)
    return summary


@task
def arithmetic_task(run: str, checkpoint: str | None, concepts: str, expression: str) -> dict:
    cfg, G, _, _ = load_run(Path(run), _checkpoint(checkpoint))
    figure, summary = vector_arithmetic(G, sheet_noise(cfg), parse_arithmetic(concepts, expression, SHEET_SIZE))
    _save_figure(run, "vector_arithmetic", figure)
    return summary


@task
def removal_task(run: str, checkpoint: str | None, boxes: str) -> dict:
    cfg, G, _, _ = load_run(Path(run), _checkpoint(checkpoint))
    parsed = load_boxes(Path(boxes), cfg["resolution"], SHEET_SIZE)
    images, summary = feature_map_removal(G, sheet_noise(cfg), parsed, cfg["resolution"])
    _save_figure(run, "feature_removal", before_after_grid(images, summary["annotated_samples"]))
    return summary


@task
def svhn_task(run: str, checkpoint: str | None, svhn: str, draws: int, device: str) -> dict:
    _, _, D, _ = load_run(Path(run), _checkpoint(checkpoint))
    train = load_svhn_mat(Path(svhn) / "train_32x32.mat")
    test = load_svhn_mat(Path(svhn) / "test_32x32.mat")
    return svhn_protocol(lambda x: extract_features(D, x, device=device), train, test, draws=draws)


def _samples_section(q: dict) -> str:
    md = (
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
    return md + "\n![memorisation](figures/memorisation.png)\n\n"


def _fid_section(f: dict) -> str:
    kid = f["kid"]
    return (
        "## FID and KID\n\n"
        f"Network: {f['network']}, from `{f['weights']}` (sha256 {f['sha256'][:16]}...), pool3 features (2048-d) "
        f"of {f['images']} generated and {f['images']} training images, upscaled bilinearly to 299 px. FID is "
        "biased at small N: compare FIDs only at equal image counts. KID is the unbiased MMD^2 (cubic kernel) "
        f"over {kid['subsets']} subsets of {kid['subset_size']}.\n\n"
        + table(
            [("FID", f"{f['fid']:.2f}"), ("KID x 1e3", f"{kid['mean'] * 1e3:.2f} +- {kid['std'] * 1e3:.2f}")],
            ("metric", "value"),
        )
        + "\n"
    )


def _sheet_section(s: dict) -> str:
    return (
        f"## Sample sheet\n\n{s['samples']} samples from fixed z's (seed {s['seed']}, saved in `{s['z']}`); the "
        "vector arithmetic (`--arithmetic`) and the feature-map removal boxes (`--boxes`) refer to these indices.\n"
        f"\n![sample sheet]({s['figure']})\n\n"
    )


def _guided_section(g: dict) -> str:
    rows = [
        (name, ", ".join(map(str, g[name]["channels"])), ", ".join(f"{a:.3g}" for a in g[name]["mean_max_activation"]))
        for name in ("trained_D", "random_D")
    ]
    return (
        "## Feature visualisation: guided backpropagation (paper 6.2)\n\n"
        f"The {g['layer']}: channels ranked by their spatial maximum averaged over {g['images']} training images; "
        "each row shows the training images that activate one channel most, each beside the guided-backprop "
        "gradient of that channel's strongest unit with respect to the pixels (LeakyReLU: true slope, negative "
        "gradients clamped). Left: trained D; right: the same architecture with random weights.\n\n"
        + table(rows, ("model", "top channels", "mean max activation"))
        + "\n![guided backpropagation](figures/guided_backprop.png)\n\n"
    )


def _arithmetic_section(a: dict) -> str:
    concepts = "; ".join(f"{n} = mean of #{', #'.join(map(str, idx))}" for n, idx in a["concepts"].items())
    return (
        "## Vector arithmetic (paper 6.3.2)\n\n"
        f"{concepts}. Result: {a['expression']} (|z| = {a['result_z_norm']:.2f}), shown first in the last row, "
        f"then {a['neighbours']} neighbours with uniform noise in +-{a['noise_scale']} added to the result z. "
        "Rows above: each concept's exemplars and the sample of their mean z.\n"
        "\n![vector arithmetic](figures/vector_arithmetic.png)\n\n"
    )


def _removal_section(r: dict) -> str:
    rows = [
        ("annotated samples (boxes)", f"{', '.join(map(str, r['annotated_samples']))} ({r['boxes']})"),
        ("layer", r["layer"]),
        ("positions inside / outside boxes", f"{r['positions_inside']} / {r['positions_outside']}"),
        ("logistic regression balanced accuracy", f"{r['balanced_accuracy']:.3f}"),
        ("feature maps dropped", f"{r['maps_dropped']} of {r['maps_total']}"),
        (
            "mean pixel change inside / outside boxes",
            f"{r['pixel_change_inside']:.2f} / {r['pixel_change_outside']:.2f}",
        ),
    ]
    return (
        "## Feature-map removal (paper 6.3.1)\n\n"
        "A logistic regression on G's second-highest layer predicts whether a position lies inside a drawn box; "
        "the feature maps with positive weight are zeroed everywhere and the same sheet z's are generated again. "
        "Figure: the annotated samples first, then the rest of the sheet; each row of samples before removal is "
        "followed by the same samples after it.\n\n"
        + table(rows, ("", "value"))
        + "\n![feature removal](figures/feature_removal.png)\n\n"
    )


def _protocols_section(metrics: dict) -> str:
    md = ""
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
    return md


def _inline_figures(markdown: str, folder: Path) -> str:
    """Figure links replaced by data: URIs, since the Prefect UI does not render file links."""

    def data_uri(m: re.Match) -> str:
        png = (folder / m.group(2)).read_bytes()
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png).decode()})"

    return re.sub(r"!\[([^\]]*)\]\((figures/[^)]+\.png)\)", data_uri, markdown)


@task
def write_report(run: str, metrics: dict) -> str:
    """eval/<run>/report.md and metrics.json, the stage report, and the full report as a Prefect artifact."""
    out = eval_dir_for(Path(run))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    md = f"# Evaluation: {Path(run).name} (step {metrics['step']})\n\n"
    md += _samples_section(metrics["samples"])
    if "fid" in metrics:
        md += _fid_section(metrics["fid"])
    md += _sheet_section(metrics["sample_sheet"]) + _guided_section(metrics["guided_backprop"])
    if "arithmetic" in metrics:
        md += _arithmetic_section(metrics["arithmetic"])
    if "feature_removal" in metrics:
        md += _removal_section(metrics["feature_removal"])
    md += _protocols_section(metrics)
    atomic_write_bytes(out / "report.md", md.encode())
    # The stage report carries the latent walks inline instead of the figure links; the artifact
    # `eval-<run>-report` is the whole report with every figure inline.
    summary = "\n".join(line for line in md.splitlines() if "](figures/" not in line)
    publish(
        Path(run).parent.parent, f"eval-{Path(run).name}", summary, (out / "figures" / "latent_walks.png").read_bytes()
    )
    key = "".join(c if c.isalnum() else "-" for c in f"eval-{Path(run).name}-report".lower()).strip("-")
    create_markdown_artifact(_inline_figures(md, out), key=key, description="dcgan-pipeline: full evaluation report")
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
    checkpoint: str | None = None,
    inception: str | None = None,
    arithmetic: str | None = None,
    expression: str | None = None,
    boxes: str | None = None,
    guided_images: int = 512,
) -> dict:
    """Evaluate a training run directory (`<work>/train/<run>`), its newest checkpoint unless one is given.

    Always: SWD, sample and latent-walk grids, memorisation, the numbered sample sheet and
    guided backpropagation. With their inputs: FID/KID (`inception`: a local weights file),
    vector arithmetic (`arithmetic` + `expression`), feature-map removal (`boxes`), and the
    CIFAR-10 and SVHN protocols. Every input is checked before anything is written.
    """
    check_inputs(
        Path(run),
        checkpoint=_checkpoint(checkpoint),
        cifar10=Path(cifar10) if cifar10 else None,
        svhn=Path(svhn) if svhn else None,
        inception=Path(inception) if inception else None,
        arithmetic=arithmetic,
        expression=expression,
        boxes=Path(boxes) if boxes else None,
    )
    metrics: dict = {"samples": samples_task(run, checkpoint, swd_images)}
    metrics["step"] = metrics["samples"].pop("step")
    metrics["sample_sheet"] = sample_sheet_task(run, checkpoint)
    metrics["guided_backprop"] = guided_backprop_task(run, checkpoint, guided_images)
    if inception is not None:
        metrics["fid"] = fid_task(run, checkpoint, inception, swd_images, device)
    if arithmetic is not None:
        metrics["arithmetic"] = arithmetic_task(run, checkpoint, arithmetic, expression)
    if boxes is not None:
        metrics["feature_removal"] = removal_task(run, checkpoint, boxes)
    if cifar10 is not None:
        metrics.update(cifar10_task(run, checkpoint, cifar10, limit_train, limit_test, device))
    if svhn is not None:
        metrics["svhn"] = svhn_task(run, checkpoint, svhn, svhn_draws, device)
    return {**metrics, "eval_dir": write_report(run, metrics)}
