"""Evaluation flow: the paper's CIFAR-10 protocol on a training run, with a report."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task

from dcgan.evaluation.cifar import cifar10_protocol, seeded
from dcgan.evaluation.features import extract_features
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.svhn import load_svhn_mat, svhn_protocol
from flows.reports import publish, table
from preprocessing.tar_shards import atomic_write_json


def eval_dir_for(run_dir: Path) -> Path:
    """`<work>/train/<run>` -> `<work>/eval/<run>`."""
    return run_dir.parent.parent / "eval" / run_dir.name


@task
def cifar10_task(run: str, cifar10: str, limit_train: int | None, limit_test: int | None, device: str) -> dict:
    cfg, _, D, step = load_run(Path(run))
    random_d = seeded(load_run(Path(run))[2], seed=12345)
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
    publish(Path(run).parent.parent, f"eval-{Path(run).name}", md)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return str(out)


@flow(name="evaluate")
def evaluate_flow(
    run: str,
    cifar10: str | None = None,
    svhn: str | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    svhn_draws: int = 10,
    device: str = "cpu",
) -> dict:
    """Evaluate the newest checkpoint of a training run directory (`<work>/train/<run>`)."""
    if cifar10 is None and svhn is None:
        raise ValueError("give at least one of cifar10 or svhn")
    metrics: dict = {}
    if cifar10 is not None:
        metrics.update(cifar10_task(run, cifar10, limit_train, limit_test, device))
    if svhn is not None:
        metrics["svhn"] = svhn_task(run, svhn, svhn_draws, device)
        metrics.setdefault("step", load_run(Path(run))[3])
    return {**metrics, "eval_dir": write_report(run, metrics)}
