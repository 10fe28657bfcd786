"""A linear L2-SVM (squared hinge loss, L2 penalty), one-vs-rest, as in the paper's protocols.

Solves the LinearSVC primal, 0.5 |w|^2 + C sum_i max(0, 1 - y_i (w.x_i + b))^2 per class,
with full-batch L-BFGS in torch on float32 features (liblinear would first copy 50k x 28,672
features to float64: 11 GB). Features are standardised with the training set's statistics.
C is chosen on a validation split held out from the training set, then the model is refit
on the whole training set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearSVM:
    weight: torch.Tensor  # (F, K)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    classes: np.ndarray
    C: float

    def decision(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            xb = (torch.from_numpy(np.asarray(x[i : i + batch], np.float32)) - self.mean) / self.scale
            out.append((xb @ self.weight + self.bias).numpy())
        return np.concatenate(out)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[self.decision(x).argmax(1)]

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


def _standardise(x: np.ndarray, batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 standardised copy plus the mean and scale used."""
    xs = torch.from_numpy(np.asarray(x, np.float32))
    mean = xs.mean(0)
    scale = xs.std(0).clamp_min(1e-6)
    for i in range(0, len(xs), batch):
        xs[i : i + batch] = (xs[i : i + batch] - mean) / scale
    return xs, mean, scale


def fit_svm(x: np.ndarray, y: np.ndarray, C: float, *, max_iter: int = 500) -> LinearSVM:
    """Train one-vs-rest squared-hinge SVMs for all classes at once."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as feature rows (got {len(x)} rows, {len(y)} labels)")
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("an SVM needs at least two classes in its training labels")
    xs, mean, scale = _standardise(x)
    n, f = xs.shape
    targets = -torch.ones(n, len(classes))
    targets[torch.arange(n), torch.from_numpy(yi)] = 1.0
    w = torch.zeros(f, len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = (1 - targets * (xs @ w + b)).clamp_min(0)
        # The primal divided by C*n: the same minimiser, better conditioned.
        loss = 0.5 * (w * w).sum() / (C * n) + (margin * margin).sum() / n
        loss.backward()
        return loss

    opt.step(closure)
    return LinearSVM(w.detach(), b.detach(), mean, scale, classes, C)


def select_and_fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    val_fraction: float = 0.1,
    grid: tuple[float, ...] = C_GRID,
    seed: int = 0,
) -> tuple[LinearSVM, dict[float, float]]:
    """Choose C on a held-out validation split of the training set, then refit on all of it."""
    n = len(x_train)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(n * val_fraction))
    val, fit = order[:n_val], order[n_val:]
    scores = {}
    for C in grid:
        model = fit_svm(x_train[np.sort(fit)], np.asarray(y_train)[np.sort(fit)], C)
        scores[C] = model.accuracy(x_train[np.sort(val)], np.asarray(y_train)[np.sort(val)])
        log.info("L2-SVM C=%g: validation accuracy %.4f", C, scores[C])
    best = max(grid, key=lambda c: (scores[c], -c))
    return fit_svm(x_train, y_train, best), scores
