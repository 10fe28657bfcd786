"""The evaluation report as markdown: one section per part that ran, figures linked from figures/.

Prefect-free, so the same text serves the report file, the stage report and the artifact.
"""

from __future__ import annotations

from preprocessing.markdown import table


def render_report(run_name: str, metrics: dict) -> str:
    """The whole report of one evaluation (`metrics` as metrics.json holds it)."""
    md = f"# Evaluation: {run_name} (step {metrics['step']})\n\n"
    md += _samples_section(metrics["samples"])
    if "fid" in metrics:
        md += _fid_section(metrics["fid"])
    md += _sheet_section(metrics["sample_sheet"]) + _guided_section(metrics["guided_backprop"])
    if "arithmetic" in metrics:
        md += _arithmetic_section(metrics["arithmetic"])
    if "feature_removal" in metrics:
        md += _removal_section(metrics["feature_removal"])
    return md + _protocols_section(metrics)


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
            (
                name,
                f"{r['test_accuracy'] * 100:.2f}%",
                r["feature_dim"],
                f"{r['C']:g}" + (f" (at the {r['c_grid_end']} end of the values tried)" if r.get("c_grid_end") else ""),
                r["n_train"],
                r["n_test"],
                r.get("precision", "fp32"),
                f"{r['feature_seconds']:.0f} + {r['svm_seconds']:.0f}",
            )
            for name, r in metrics["cifar10"].items()
        ]
        md += (
            "## CIFAR-10: discriminator features + linear L2-SVM (paper section 5.1)\n\n"
            "Every conv layer of D max-pooled to 4x4 and concatenated; squared-hinge L2-SVM with C chosen on a "
            "10% validation split of the training images. The paper reports 82.8% (D trained on ImageNet-1k).\n\n"
        )
        md += table(
            rows,
            (
                "features",
                "test accuracy",
                "dim",
                "C",
                "train images",
                "test images",
                "precision",
                "seconds: features + SVM",
            ),
        )
    if "svhn" in metrics:
        r = metrics["svhn"]
        md += (
            "\n## SVHN: 1000 labels, L2-SVM on D features (paper section 5.2)\n\n"
            f"Test error {r['test_error_mean'] * 100:.2f}% +- {r['test_error_std'] * 100:.2f}% over {r['draws']} "
            f"draws of {r['labelled']} labelled images (C={r['C']:g}, chosen on {r['n_val']} validation images). "
            "The paper reports 22.48% for DCGAN + L2-SVM.\n"
        )
    return md
