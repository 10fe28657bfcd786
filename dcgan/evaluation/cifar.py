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
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from dcgan.evaluation.features import extract_features
from dcgan.evaluation.svm import select_and_fit

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """A user-facing problem with evaluation inputs."""


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


def svm_protocol(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], features) -> dict:  # noqa: ANN001
    """Fit the L2-SVM on features(train) with C chosen on a held-out split; report test accuracy."""
    t0 = time.perf_counter()
    x_train, x_test = features(train[0]), features(test[0])
    t_feat = time.perf_counter() - t0
    model, scores = select_and_fit(x_train, train[1])
    accuracy = model.accuracy(x_test, test[1])
    return {
        "test_accuracy": accuracy,
        "C": model.C,
        "validation_accuracy": {str(k): v for k, v in scores.items()},
        "feature_dim": int(x_train.shape[1]),
        "n_train": len(train[1]),
        "n_test": len(test[1]),
        "feature_seconds": t_feat,
        "total_seconds": time.perf_counter() - t0,
    }


def pixel_features(images: np.ndarray) -> np.ndarray:
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
) -> dict:
    """Test accuracy of the trained D's features, a random D's, and raw pixels (32x32)."""
    cifar = Path(cifar)
    train32 = load_labelled_images(cifar / "train.parquet", limit_train)
    test32 = load_labelled_images(cifar / "test.parquet", limit_test)

    def at_resolution(images: np.ndarray) -> np.ndarray:
        if resolution == 32:
            return images
        return np.stack([cv2.resize(im, (resolution, resolution), interpolation=cv2.INTER_CUBIC) for im in images])

    train, test = (at_resolution(train32[0]), train32[1]), (at_resolution(test32[0]), test32[1])
    results = {}
    for name, model in (("trained_D", discriminator), ("random_D", random_discriminator)):
        log.info("CIFAR-10: features of %s", name)
        results[name] = svm_protocol(train, test, lambda x, m=model: extract_features(m, x, device=device))
    results["raw_pixels"] = svm_protocol(train32, test32, pixel_features)
    for name, r in results.items():
        log.info("CIFAR-10 %s: test accuracy %.4f (C=%g, %d-d)", name, r["test_accuracy"], r["C"], r["feature_dim"])
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
