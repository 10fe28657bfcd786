"""The paper's SVHN protocol (section 5.2) on the official cropped-digit files.

train_32x32.mat / test_32x32.mat hold `X` (32, 32, 3, N) uint8 and `y` (N, 1) with labels
1..10, where 10 stands for the digit 0. As in the paper: a 10,000-image validation split of
the training set chooses C; the L2-SVM is trained on 1000 labelled examples, 100 per class,
drawn from the rest; the test error is reported as mean and spread over several draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.io

from dcgan.evaluation.cifar import EvaluationError, check_c_grid, check_finite
from dcgan.evaluation.progress import Progress
from dcgan.evaluation.svm import C_GRID, GRID_EXTENSIONS, fit_svm, select_and_fit

log = logging.getLogger(__name__)

SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def check_svhn_mat(path: Path) -> Path:
    """The path, once its variable directory shows the official X (32, 32, 3, N) and y (N, 1); loads no data."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"SVHN file not found: {path}")
    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
    except (ValueError, OSError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise EvaluationError(f"{path} is not a readable .mat file: {exc}") from exc
    if "X" not in shapes or "y" not in shapes:
        raise EvaluationError(f"{path} lacks the official keys 'X' and 'y' (has {sorted(shapes)})")
    x, y = shapes["X"], shapes["y"]
    if len(x) != 4 or x[:3] != (32, 32, 3) or x[3] != max(y):
        raise EvaluationError(f"{path}: X must be (32, 32, 3, N) with N = len(y), got {x} and {y}")
    return path


def load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and labels 0..9 from an official SVHN .mat file."""
    path = check_svhn_mat(path)
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise EvaluationError(f"{path} is not a readable .mat file: {exc}") from exc
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)).astype(np.uint8)), np.where(y == 10, 0, y).astype(int)


def svhn_protocol(
    features: Callable[[np.ndarray, str], np.ndarray],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    val_size: int = 10_000,
    per_class: int = 100,
    draws: int = 10,
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
    grid_extensions: int = GRID_EXTENSIONS,
    device: str = "cpu",
    precision: str = "auto",
) -> dict:
    """Test error (mean, std over `draws`) of an L2-SVM on `per_class` labels per class.

    C is chosen once, on the first draw against the validation split, then kept for every draw.
    features(images, label) returns one row per image; the label names the step in progress logs.
    """
    c_grid = check_c_grid(c_grid)
    if draws < 1:
        raise EvaluationError(f"SVHN needs at least one draw, got {draws}")
    images, labels = train
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    val, pool = np.sort(order[:val_size]), order[val_size:]
    classes = np.unique(labels)
    short = [c for c in classes if (labels[pool] == c).sum() < per_class]
    if short or len(val) == 0:
        raise EvaluationError(f"too few training images for {per_class} per class plus a validation split")
    x_val = features(images[val], f"SVHN features of {len(val)} validation images")
    x_test = features(test[0], f"SVHN features of {len(test[0])} test images")
    check_finite(x_val, "the SVHN validation images")
    check_finite(x_test, "the SVHN test images")

    def draw() -> np.ndarray:
        return np.sort(np.concatenate([rng.choice(pool[labels[pool] == c], per_class, replace=False) for c in classes]))

    first = draw()
    x_first = features(images[first], f"SVHN features of draw 1 ({len(first)} images)")
    model, scores = select_and_fit(
        x_first,
        labels[first],
        grid=c_grid,
        extensions=grid_extensions,
        device=device,
        precision=precision,
        desc="SVHN L2-SVM",
        validation=(x_val, labels[val]),
    )
    best, grid_end = model.C, model.grid_end
    errors = []
    with Progress("SVHN draws", draws, unit="draws") as progress:
        for i in range(draws):
            if i:
                idx = draw()
                x_draw = features(images[idx], f"SVHN features of draw {i + 1} ({len(idx)} images)")
                model = fit_svm(x_draw, labels[idx], best, device=device, precision=precision)
            errors.append(1 - model.accuracy(x_test, test[1]))
            progress.update(1, f"test error {errors[-1]:.4f}")
    log.info("SVHN: test error %.4f +- %.4f over %d draws (C=%g)", np.mean(errors), np.std(errors), draws, best)
    return {
        "test_error_mean": float(np.mean(errors)),
        "test_error_std": float(np.std(errors)),
        "errors": [float(e) for e in errors],
        "C": best,
        "validation_accuracy": {str(k): v for k, v in sorted(scores.items())},
        "c_grid_end": grid_end,
        "labelled": per_class * len(classes),
        "draws": draws,
        "n_val": int(len(val)),
        "n_test": int(len(test[1])),
    }
