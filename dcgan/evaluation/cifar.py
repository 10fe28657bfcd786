"""The paper's CIFAR-10 protocol (section 5.1): D features + linear L2-SVM, with baselines.

Train and test images come from image tables (`key, label, image` with encoded bytes, like
../shared/data/cifar10/{train,test}.parquet). Features are taken from the discriminator at
its own resolution (CIFAR images are resized when it is not 32 px). The same pipeline runs
for the trained D, for the same architecture with random weights, and for raw pixels, so the
baselines differ from the model only in the features.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from dcgan.evaluation.features import extract_features
from dcgan.evaluation.svm import C_GRID, GRID_EXTENSIONS, select_and_fit
from dcgan.precision import PRECISIONS, use_bfloat16
from preprocessing.errors import UserError

log = logging.getLogger(__name__)


class EvaluationError(UserError):
    """A user-facing problem with evaluation inputs."""


def check_c_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """The C grid, sorted, once every value is a positive finite number (checked before any work)."""
    try:
        values = tuple(sorted(float(c) for c in grid))
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"the SVM's C grid must be numbers, got {grid!r}") from exc
    bad = [c for c in values if not (math.isfinite(c) and c > 0)]
    if not values or bad:
        raise EvaluationError(f"the SVM's C grid needs positive, finite values, got {list(grid)!r}")
    return values


def check_limit(path: Path, limit: int | None, what: str) -> None:
    """A subset size must be positive and at most the table's row count (reads the footer only)."""
    if limit is None:
        return
    rows = pq.read_metadata(check_image_table(path)).num_rows
    if limit < 1 or limit > rows:
        raise EvaluationError(f"{what} {limit} is outside 1..{rows}, the images in {path}")


def check_finite(x: np.ndarray, what: str, batch: int = 4096) -> None:
    """NaN or inf features (a diverged checkpoint) would silently poison the SVM: refuse them."""
    for i in range(0, len(x), batch):
        if not np.isfinite(x[i : i + batch]).all():
            raise EvaluationError(f"the features of {what} contain NaN or inf (rows from {i}): a diverged checkpoint?")


def check_image_table(path: Path) -> Path:
    """The path, once it is a Parquet table with `image` and `label` columns (reads the schema only)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"image table not found: {path}")
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path} is not a Parquet table: {exc}") from exc
    missing = {"image", "label"} - set(names)
    if missing:
        raise EvaluationError(f"{path} lacks column(s) {sorted(missing)}; expected key, label, image (bytes)")
    return path


def load_labelled_images(
    path: Path, limit: int | None = None, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and int labels from an image table; `limit` draws a seeded subset."""
    path = check_image_table(path)
    table = pq.read_table(path, columns=["image", "label"])
    rows = np.arange(table.num_rows)
    if limit is not None and limit < table.num_rows:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
        table = table.take(rows)
    images = np.empty((table.num_rows, size, size, 3), np.uint8)
    for i, data in enumerate(table.column("image").to_pylist()):
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if rgb.shape[:2] != (size, size):
            h, w = rgb.shape[:2]
            s = min(h, w)
            rgb = rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_CUBIC)
        images[i] = rgb
    return images, np.asarray(table.column("label").to_pylist())


def svm_protocol(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    features: Callable[[np.ndarray, str], np.ndarray],
    *,
    name: str = "features",
    c_grid: Sequence[float] = C_GRID,
    grid_extensions: int = GRID_EXTENSIONS,
    device: str = "cpu",
    precision: str = "auto",
) -> dict:
    """Fit the L2-SVM on features(train) with C chosen on a held-out split; report test accuracy.

    features(images, label) returns one row per image; the label names the step in progress logs.
    """
    c_grid = check_c_grid(c_grid)
    t0 = time.perf_counter()
    x_train = features(train[0], f"{name} of {len(train[0])} training images")
    x_test = features(test[0], f"{name} of {len(test[0])} test images")
    check_finite(x_train, name)
    check_finite(x_test, name)
    t_feat = time.perf_counter() - t0
    model, scores = select_and_fit(
        x_train,
        train[1],
        grid=c_grid,
        extensions=grid_extensions,
        device=device,
        precision=precision,
        desc=f"L2-SVM on {name}",
    )
    accuracy = model.accuracy(x_test, test[1])
    return {
        "test_accuracy": accuracy,
        "C": model.C,
        "validation_accuracy": {str(k): v for k, v in sorted(scores.items())},
        "c_grid_end": model.grid_end,
        "feature_dim": int(x_train.shape[1]),
        "n_train": len(train[1]),
        "n_test": len(test[1]),
        "precision": "bf16" if use_bfloat16(precision, device) else "fp32",
        "feature_seconds": t_feat,
        "svm_seconds": time.perf_counter() - t0 - t_feat,
        "total_seconds": time.perf_counter() - t0,
    }


def pixel_features(images: np.ndarray, label: str | None = None) -> np.ndarray:
    """Raw pixels as the baseline's features (the label is for the common features signature)."""
    del label
    return images.reshape(len(images), -1).astype(np.float16)


def cifar10_protocol(
    discriminator: nn.Module,
    random_discriminator: nn.Module,
    cifar: Path,
    resolution: int,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    device: str = "cpu",
    c_grid: Sequence[float] = C_GRID,
    grid_extensions: int = GRID_EXTENSIONS,
    precision: str = "auto",
) -> dict:
    """Test accuracy of the trained D's features, a random D's, and raw pixels (32x32).

    Every input (C grid, subset sizes, tables, precision) is checked before any image is decoded.
    `precision` applies to the D features and the SVM (dcgan.precision).
    """
    cifar = Path(cifar)
    c_grid = check_c_grid(c_grid)
    if grid_extensions < 0:
        raise EvaluationError(f"grid extensions must be >= 0, got {grid_extensions}")
    if precision not in PRECISIONS:
        raise EvaluationError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_limit(cifar / "train.parquet", limit_train, "--limit-train")
    check_limit(cifar / "test.parquet", limit_test, "--limit-test")
    train32 = load_labelled_images(cifar / "train.parquet", limit_train)
    test32 = load_labelled_images(cifar / "test.parquet", limit_test)

    def at_resolution(images: np.ndarray) -> np.ndarray:
        if resolution == 32:
            return images
        return np.stack([cv2.resize(im, (resolution, resolution), interpolation=cv2.INTER_CUBIC) for im in images])

    train, test = (at_resolution(train32[0]), train32[1]), (at_resolution(test32[0]), test32[1])
    settings = {"c_grid": c_grid, "grid_extensions": grid_extensions, "device": device, "precision": precision}
    results = {}
    for name, model in (("trained_D", discriminator), ("random_D", random_discriminator)):
        log.info("CIFAR-10: features of %s", name)
        results[name] = svm_protocol(
            train,
            test,
            lambda x, label, m=model: extract_features(m, x, device=device, progress=label, precision=precision),
            name=name,
            **settings,
        )
    results["raw_pixels"] = svm_protocol(train32, test32, pixel_features, name="raw_pixels", **settings)
    for name, r in results.items():
        end = f", C at the {r['c_grid_end']} end of the grid" if r["c_grid_end"] else ""
        log.info(
            "CIFAR-10 %s: test accuracy %.4f (C=%g, %d-d%s)", name, r["test_accuracy"], r["C"], r["feature_dim"], end
        )
    return results


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture re-initialised with the paper's N(0, 0.02) weights and a fixed seed."""
    from dcgan.models import init_weights

    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model.apply(init_weights)
    return model
