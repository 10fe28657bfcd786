"""Group near duplicates in two steps: candidates from the 128-bit hash, then verification.

1. Pixel-identical crops (equal content digests) join at once, in one hash pass; only one
   representative of each set (the first in keeper order) goes on, so a set of identical
   images costs nothing more.
2. Candidates: pairs of representatives whose codes are within Hamming radius R, found by
   multi-index hashing with a bucket cap (dedup.candidates; radius 0 is the paper's exact
   code match).
3. Verification: each candidate pair is judged on the thumbnails (dedup.verify). Only
   verified pairs link items, so a larger radius buys recall without costing precision.
4. Groups are stars around a keeper, never chains: representatives are taken in keeper order
   (`rank`, e.g. `keeper_rank`), and each joins the first keeper it was verified against, else
   becomes a keeper itself. So every member passes the verify rule against its keeper (identical
   members trivially); connected components would let A~B, B~C merge A with a C that looks
   nothing like it. A group's id is its keeper's index.
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
    group: np.ndarray  # (N,) int64 group id: the index of the group's keeper
    low_content: np.ndarray  # (N,) bool: spread under the contrast floor (merged only when near-identical)
    identical_pairs: int = 0  # items linked to a pixel-identical item earlier in keeper order
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


def stars(n: int, a: np.ndarray, b: np.ndarray, fixed: np.ndarray | None = None) -> np.ndarray:
    """Keeper of each of n items taken in index order, linked by pairs a < b: the first keeper it is linked to.

    An item linked to no earlier keeper (or `fixed`) is its own keeper, so every member is linked
    to its keeper directly. Greedy and sequential by nature: one Python pass over the links,
    which are few (verified pairs) next to the items.
    """
    keeper = np.arange(n, dtype=np.int64)
    if fixed is not None:
        a, b = a[~fixed[b]], b[~fixed[b]]
    by = np.lexsort((a, b))  # each item's links together, earliest partner first
    is_keeper = bytearray(b"\x01") * n
    joined: list[int] = []
    to: list[int] = []
    last = -1
    for u, v in zip(a[by].tolist(), b[by].tolist(), strict=True):
        if v != last and is_keeper[u]:  # u < v: u's role was settled before v's
            is_keeper[v] = 0
            joined.append(v)
            to.append(u)
            last = v
    keeper[joined] = to
    return keeper


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
    rank: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> Grouping:
    """Group N items: codes (N, 16) uint8; their thumbnails are `thumbs[rows]` (rows default: all).

    `content` (N digests of the crop pixels) merges identical crops before any hashing.
    `stats` are the thumbnails' ThumbStats when the caller has them already (same rows as thumbs).
    `rank` (N,) is the keeper order (lowest first, e.g. `keeper_rank`; default: item order), so a
    group's keeper is its lowest-ranked member. `kept` (N,) bool marks keepers of an earlier
    grouping: they come first and stay keepers, and new items join them as they would any keeper.
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
    fixed = np.zeros(n, bool) if kept is None else np.asarray(kept, bool)
    rank = np.arange(n) if rank is None else np.asarray(rank)
    order = np.lexsort((rank, ~fixed))  # item at each position of the keeper order (stable: ties by index)
    fixed = fixed[order]
    head = np.arange(n, dtype=np.int64)  # by position: the position each item joins (itself for keepers)
    reps = head.copy()  # positions of the items that go on to the hash
    if content is not None:
        first = first_of_equal(pa.array(content, type=pa.binary()).take(pa.array(order)))
        first[fixed] = np.flatnonzero(fixed)  # an earlier keeper never joins another
        reps = np.flatnonzero(first == head)
        dup = np.flatnonzero(first != head)
        head[dup] = first[dup]
        result.identical_pairs = len(dup)
    items = order[reps]  # item index of each representative, in keeper order
    tiebreak = stats.mean[rows[items]]  # orders members of oversize buckets of identical codes
    linked_a: list[np.ndarray] = []
    linked_b: list[np.ndarray] = []
    for a, b in candidate_pairs(codes[items], radius, cap=cap, tiebreak=tiebreak, stats=result.candidates):
        verdict = verify_pairs(thumbs, stats, rows[items[a]], rows[items[b]], rule)
        result.candidate_pairs += len(a)
        result.verified_pairs += int(verdict.ok.sum())
        result.low_content_pairs += int(verdict.low_content.sum())
        linked_a.append(a[verdict.ok])
        linked_b.append(b[verdict.ok])
    empty = np.zeros(0, np.int64)
    keeper = stars(len(reps), np.concatenate(linked_a or [empty]), np.concatenate(linked_b or [empty]), fixed[reps])
    head[reps] = reps[keeper]
    head = head[head]  # an identical copy joins its representative's keeper
    result.group[order] = order[head]
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
