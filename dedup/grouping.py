"""Group near duplicates in two steps: candidates from the 128-bit hash, then verification.

1. Pixel-identical crops (equal content digests) are one group at once, in one hash pass;
   only one representative of each goes on, so a set of identical images costs nothing more.
2. Candidates: pairs of representatives whose codes are within Hamming radius R, found by
   multi-index hashing with a bucket cap (dedup.candidates; radius 0 is the paper's exact
   code match).
3. Verification: each candidate pair is judged on the thumbnails (dedup.verify). Only
   verified pairs link items, so a larger radius buys recall without costing precision.
4. Groups are the connected components of the verified and identical pairs
   (scipy.sparse.csgraph); a group's id is its smallest member index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dedup.candidates import BITS, CandidateStats, candidate_pairs
from dedup.contrast import ThumbStats
from dedup.verify import VerifyRule, verify_pairs


@dataclass
class Grouping:
    group: np.ndarray  # (N,) int64 group id (the smallest member index)
    low_content: np.ndarray  # (N,) bool: spread under the contrast floor (merged only when near-identical)
    identical_pairs: int = 0  # items linked to a pixel-identical earlier item
    candidate_pairs: int = 0  # pairs proposed by the hash (within the radius)
    verified_pairs: int = 0  # candidates that passed verification
    low_content_pairs: int = 0  # candidates judged by the near-identical rule
    candidates: CandidateStats = field(default_factory=CandidateStats)

    @property
    def rejected_pairs(self) -> int:
        return self.candidate_pairs - self.verified_pairs


def first_of_equal(values: pa.Array) -> np.ndarray:
    """For each item, the index of the first item with an equal value (one hash pass)."""
    idx = pc.dictionary_encode(values).indices.to_numpy(zero_copy_only=False)
    first = np.full(int(idx.max()) + 1 if len(idx) else 0, len(idx), dtype=np.int64)
    np.minimum.at(first, idx, np.arange(len(idx), dtype=np.int64))
    return first[idx]


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the pairs (a, b) over n items; label = smallest member index."""
    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(first, labels, np.arange(n, dtype=np.int64))
    return first[labels]


def group_near_duplicates(
    codes: np.ndarray,
    thumbs: np.ndarray,
    *,
    radius: int,
    rule: VerifyRule | None = None,
    content: list[bytes] | None = None,
    rows: np.ndarray | None = None,
    cap: int = 64,
    stats: ThumbStats | None = None,
) -> Grouping:
    """Group N items: codes (N, 16) uint8; their thumbnails are `thumbs[rows]` (rows default: all).

    `content` (N digests of the crop pixels) merges identical crops before any hashing.
    `stats` are the thumbnails' ThumbStats when the caller has them already (same rows as thumbs).
    """
    if codes.ndim != 2 or codes.shape[1] != BITS // 8:
        raise ValueError(f"codes must be (N, {BITS // 8}) uint8, got {codes.shape}")
    n = len(codes)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    if len(rows) != n:
        raise ValueError(f"{n} codes but {len(rows)} thumbnail rows")
    rule = rule or VerifyRule()
    stats = stats if stats is not None else ThumbStats.of(thumbs)
    low = stats.std[rows] < rule.contrast_floor if n else np.zeros(0, bool)
    result = Grouping(group=np.arange(n, dtype=np.int64), low_content=low)
    if n == 0:
        return result
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    reps = np.arange(n, dtype=np.int64)
    if content is not None:
        first = first_of_equal(pa.array(content, type=pa.binary()))
        dup = np.flatnonzero(first != reps)
        edges_a.append(dup)
        edges_b.append(first[dup])
        result.identical_pairs = len(dup)
        reps = np.flatnonzero(first == reps)
    tiebreak = stats.mean[rows[reps]]  # orders members of oversize buckets of identical codes
    for a, b in candidate_pairs(codes[reps], radius, cap=cap, tiebreak=tiebreak, stats=result.candidates):
        ga, gb = reps[a], reps[b]
        verdict = verify_pairs(thumbs, stats, rows[ga], rows[gb], rule)
        result.candidate_pairs += len(ga)
        result.verified_pairs += int(verdict.ok.sum())
        result.low_content_pairs += int(verdict.low_content.sum())
        edges_a.append(ga[verdict.ok])
        edges_b.append(gb[verdict.ok])
    result.group = components(n, np.concatenate(edges_a or [reps[:0]]), np.concatenate(edges_b or [reps[:0]]))
    return result


def choose_keepers(group: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Keep one item per group: the one of lowest `rank` (unique ints, e.g. from `keeper_rank`)."""
    n = len(group)
    best = np.full(n, n, np.int64)
    np.minimum.at(best, group, rank)
    keep = np.zeros(n, bool)
    winners = best[best < n]
    order = np.empty(n, np.int64)
    order[rank] = np.arange(n)
    keep[order[winners]] = True
    return keep


def keeper_rank(pixels: list[int], sources: list[str], keys: list[str]) -> np.ndarray:
    """Rank 0..N-1 by (largest source image, then source, then key): the keeper order of a group."""
    order = np.lexsort((np.array(keys, dtype=object), np.array(sources, dtype=object), -np.asarray(pixels)))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank
