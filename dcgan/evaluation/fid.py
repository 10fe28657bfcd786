"""Fréchet Inception Distance (Heusel et al. 2017) and Kernel Inception Distance (Bińkowski et al. 2018).

Both compare Inception pool3 features (`dcgan.evaluation.inception`) of generated and real
images. FID fits a Gaussian to each set; it is biased at small N, so FIDs are comparable only
at equal image counts (the usual figure uses 50k samples). KID is the unbiased estimate of the
squared MMD under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets; its expectation is 0 for equal distributions whatever N, so it may come out negative.
"""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two (N, d) feature sets.

    Tr (S_a S_b)^1/2 is the sum of the square roots of the eigenvalues of S_a S_b. With centred
    sets A, B these are the squared singular values of A B^T / sqrt((n_a - 1)(n_b - 1)) (cyclic
    permutation), so when no set is larger than d the trace is that matrix's nuclear norm: one
    SVD of an n_a x n_b matrix, exact for rank-deficient covariances. Otherwise the spectrum
    comes from the symmetric PSD matrix S_a^1/2 S_b S_a^1/2. Either way there is no complex
    round-off from a general matrix square root (pytorch-fid's scipy sqrtm).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, d) feature sets of equal d, got {a.shape} and {b.shape}")
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    trace_a = (centred_a**2).sum() / (len(a) - 1)
    trace_b = (centred_b**2).sum() / (len(b) - 1)
    if max(len(a), len(b)) <= a.shape[1]:
        singular = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)
        tr_covmean = singular.sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    else:
        w, v = np.linalg.eigh(np.cov(a, rowvar=False))
        root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        middle = root_a @ np.cov(b, rowvar=False) @ root_a
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + trace_b - 2 * tr_covmean)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with k(x, y) = (x.y / d + 1)^3: kernel means without the diagonal terms."""
    m, n, d = len(x), len(y), x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Mean and std of the unbiased MMD^2 over `subsets` random subsets of each set (KID)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 images per set")
    rng = np.random.default_rng(seed)
    values = [
        mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(subsets)
    ]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subset_size": size, "subsets": subsets}
