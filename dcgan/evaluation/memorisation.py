"""Memorisation check (paper section 6.1's concern): are samples copies of training images?

For generated samples and for real images held out of the reference set, the distance to the
nearest reference training image is measured in pixel space and in discriminator-feature
space. Samples that are much closer to the training set than held-out real images are to it
suggest memorisation; the grid shows samples next to their nearest training images.
"""

from __future__ import annotations

import numpy as np
import torch

from dcgan.evaluation.features import extract_features


def nearest(queries: np.ndarray, reference: np.ndarray, k: int = 3, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of the k nearest reference rows for each query row."""
    ref = torch.from_numpy(np.asarray(reference, np.float32))
    ref_sq = (ref * ref).sum(1)
    dists, idx = [], []
    for i in range(0, len(queries), batch):
        q = torch.from_numpy(np.asarray(queries[i : i + batch], np.float32))
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq
        top = d2.clamp_min(0).topk(min(k, len(ref)), dim=1, largest=False)
        dists.append(top.values.sqrt().numpy())
        idx.append(top.indices.numpy())
    return np.concatenate(dists), np.concatenate(idx)


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean": float(d.mean()), "median": float(np.median(d)), "p05": float(np.percentile(d, 5))}


def memorisation_check(
    samples: np.ndarray, reference: np.ndarray, held_out: np.ndarray, discriminator: torch.nn.Module
) -> tuple[dict, np.ndarray]:
    """Nearest-neighbour statistics (pixels and D features) and a grid of samples beside their neighbours."""
    if len(reference) == 0 or len(samples) == 0 or len(held_out) == 0:
        raise ValueError("memorisation check needs samples, reference and held-out images")
    result = {}
    flat = {
        name: x.reshape(len(x), -1).astype(np.float32) / 255
        for name, x in (("samples", samples), ("reference", reference), ("held_out", held_out))
    }
    feats = {
        name: extract_features(discriminator, x).astype(np.float32)
        for name, x in (("samples", samples), ("reference", reference), ("held_out", held_out))
    }
    neighbours = None
    for space, data in (("pixels", flat), ("d_features", feats)):
        d_fake, i_fake = nearest(data["samples"], data["reference"])
        d_real, _ = nearest(data["held_out"], data["reference"], k=1)
        result[space] = {
            "samples": _stats(d_fake[:, 0]),
            "held_out": _stats(d_real[:, 0]),
            "ratio_of_medians": float(np.median(d_fake[:, 0]) / max(np.median(d_real[:, 0]), 1e-12)),
        }
        if space == "pixels":
            neighbours = i_fake
    rows = []
    for s in range(min(8, len(samples))):
        rows += [samples[s]] + [reference[j] for j in neighbours[s]]
    return result, np.stack(rows)
