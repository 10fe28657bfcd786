"""Verification of candidate pairs by a real distance on the stored thumbnails.

The hash only proposes pairs; a pair becomes a duplicate when the 16x16 colour thumbnails of
its 32x32 crops correlate (Pearson, i.e. after brightness and contrast normalisation) at
least `min_similarity`. When either crop is low-content (spread under the contrast floor,
see dedup.contrast), correlation means nothing, and the pair must instead be near-identical
in raw pixels: root-mean-square difference at most `low_content_rms` grey levels. Pairs are
processed in chunks straight from a memory-mapped thumbnail file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedup.contrast import CONTRAST_FLOOR, ThumbStats


@dataclass(frozen=True)
class VerifyRule:
    min_similarity: float = 0.94  # Pearson correlation of the thumbnails; -1 accepts every candidate
    low_content_rms: float = 4.0  # grey levels, for pairs with a low-content member
    contrast_floor: float = CONTRAST_FLOOR


@dataclass
class Verdict:
    similarity: np.ndarray  # (P,) float32 Pearson correlation of the thumbnails
    rms: np.ndarray  # (P,) float32 raw root-mean-square difference, grey levels
    low_content: np.ndarray  # (P,) bool: a member is low-content, so `rms` decided
    ok: np.ndarray  # (P,) bool


def verify_pairs(
    thumbs: np.ndarray,
    stats: ThumbStats,
    a: np.ndarray,
    b: np.ndarray,
    rule: VerifyRule,
    *,
    rows: np.ndarray | None = None,
    chunk: int = 32768,
) -> Verdict:
    """Judge pairs (a[k], b[k]) of item indices; `rows` maps item index -> row of `thumbs`/`stats`."""
    p = len(a)
    sim, rms = np.empty(p, np.float32), np.empty(p, np.float32)
    ra, rb = (a, b) if rows is None else (rows[a], rows[b])
    d = int(np.prod(thumbs.shape[1:]))
    flat = thumbs.reshape(len(thumbs), d)
    for s in range(0, p, chunk):
        ia, ib = ra[s : s + chunk], rb[s : s + chunk]
        # exact integer dot products (768 x 255^2 < 2^31): twice as fast as float32 here
        dot = np.einsum("ij,ij->i", flat[ia].astype(np.int16), flat[ib].astype(np.int16), dtype=np.int32)
        dot = dot.astype(np.float64)
        cov = dot / d - stats.mean[ia] * stats.mean[ib]
        spread = np.maximum(stats.std[ia], 1e-9) * np.maximum(stats.std[ib], 1e-9)
        sim[s : s + chunk] = np.clip(cov / spread, -1.0, 1.0)
        rms[s : s + chunk] = np.sqrt(np.maximum(stats.sumsq[ia] + stats.sumsq[ib] - 2 * dot, 0.0) / d)
    low = np.minimum(stats.std[ra], stats.std[rb]) < rule.contrast_floor if p else np.zeros(0, bool)
    ok = np.where(low, rms <= rule.low_content_rms, sim >= rule.min_similarity)
    return Verdict(similarity=sim, rms=rms, low_content=low, ok=ok)
