"""Candidate pairs from 128-bit codes in linear time: multi-index hashing with a bucket cap.

Split the code into R + 1 chunks; two codes within Hamming distance R agree exactly on at
least one chunk (pigeonhole), so only items sharing a chunk value become candidates (Norouzi
et al.'s multi-index hashing; the paper's exact-code hash is R = 0, one chunk of 128 bits).
A bucket larger than `cap` is never expanded into all its pairs: it is split by the next
chunk's bits, again and again, and a bucket of identical codes still above the cap pairs each
member only with its `cap` neighbours in the order of a caller-given key (e.g. brightness).
Splitting can lose a pair that shares only the split chunk; the counts say how often it ran.
Pairs come out in batches, already filtered to Hamming distance <= R. A pair that shares
several chunks is emitted once, with no set of seen pairs: at chunk k it is dropped when it
also shares, at an earlier chunk j, every chunk that keyed the bucket it was expanded in at j
(its depth), or is a pair of identical codes windowed before (the same neighbours). The
cost is bounded by (items x chunks x cap) whatever the data, and memory by one bucket batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BITS = 128
WINDOWED = 255  # depth of an item whose oversize bucket of identical codes paired neighbours only


@dataclass
class CandidateStats:
    candidate_pairs: int = 0  # pairs within the radius handed to verification
    buckets_split: int = 0  # buckets above the cap, split by more bits
    buckets_windowed: int = 0  # buckets of identical codes still above the cap: neighbours only
    largest_bucket: int = 0


def code_words(codes: np.ndarray) -> np.ndarray:
    """(N, 16) uint8 codes -> (N, 2) uint64 big-endian words (bit 0 = the first code unit)."""
    if codes.ndim != 2 or codes.shape[1] != BITS // 8 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be (N, {BITS // 8}) uint8, got {codes.shape} {codes.dtype}")
    return np.ascontiguousarray(codes).view(">u8").astype(np.uint64)


def chunk_bounds(radius: int) -> np.ndarray:
    return np.linspace(0, BITS, radius + 2).astype(int)


def chunk_values(words: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bits [start, stop) of each 128-bit code as an integer (stop - start <= 64)."""
    width = stop - start
    if not 0 < width <= 64:
        raise ValueError(f"a chunk is 1 to 64 bits, got {width}")
    hi, lo = words[:, 0], words[:, 1]
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
    if stop <= 64:
        return (hi >> np.uint64(64 - stop)) & mask
    if start >= 64:
        return (lo >> np.uint64(128 - stop)) & mask
    low_bits = stop - 64  # bits taken from lo
    top = (hi & np.uint64((1 << (64 - start)) - 1)) << np.uint64(low_bits)
    return (top | (lo >> np.uint64(64 - low_bits))) & mask


def hamming(words: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = words[a] ^ words[b]
    return (np.bitwise_count(x[:, 0]) + np.bitwise_count(x[:, 1])).astype(np.int64)


def _runs(keys: list[np.ndarray], order_only: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by keys (last key primary); returns (order, run start of each sorted position, run end).

    Runs are equal values of the keys after the first `order_only`, which only order members.
    """
    order = np.lexsort(keys) if len(keys) > 1 else np.argsort(keys[0], kind="stable")
    n = len(order)
    change = np.zeros(n, bool)
    if n:
        change[0] = True
        for k in keys[order_only:]:
            sk = k[order]
            change[1:] |= sk[1:] != sk[:-1]
    starts = np.flatnonzero(change)
    run_id = np.cumsum(change) - 1
    ends = np.r_[starts[1:], n]
    return order, starts[run_id], ends[run_id]


def _neighbour_pairs(
    order: np.ndarray, end: np.ndarray, max_offset: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (order[j], order[j + d]) inside each run, for d = 1 .. max_offset (None: whole runs)."""
    active = np.flatnonzero(end - np.arange(len(order)) >= 2)
    d = 1
    while len(active) and (max_offset is None or d <= max_offset):
        active = active[active + d < end[active]]
        if len(active):
            yield order[active], order[active + d]
        d += 1


def _chunk_pairs(
    words: np.ndarray,
    members: np.ndarray,
    bounds: np.ndarray,
    chunk: int,
    cap: int,
    tiebreak: np.ndarray,
    stats: CandidateStats,
    depth: np.ndarray,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs of `members` that share chunk `chunk`, with oversize buckets split as the module says.

    Sets `depth[i]`: how many chunks (from this one on, cyclically) keyed the bucket whose pairs
    were all emitted with member i; WINDOWED when i's bucket only paired neighbours.
    """
    n_chunks = len(bounds) - 1
    keys = [chunk_values(words[members], bounds[chunk], bounds[chunk + 1])]
    local = np.arange(len(members))
    used = 1
    while len(local):
        order, start, end = _runs(keys)
        size = end - start
        stats.largest_bucket = max(stats.largest_bucket, int(size.max()) if len(size) else 0)
        small = size <= cap
        # runs within the cap: every pair (a run's positions are contiguous, so one mask keeps them)
        s_order, s_end = order[small], end[small]
        s_pos = np.flatnonzero(small)
        # re-index the kept runs compactly so that `end` refers to positions in s_order
        shift = np.cumsum(~small)
        depth[members[local[s_order]]] = used
        yield from (
            (members[local[a]], members[local[b]]) for a, b in _neighbour_pairs(s_order, s_end - shift[s_pos], None)
        )
        big = order[~small]
        if not len(big):
            return
        big_start = start[~small]
        stats.buckets_split += len(np.unique(big_start))
        if used == n_chunks:  # identical codes above the cap: neighbours in tiebreak order only
            stats.buckets_windowed += len(np.unique(big_start))
            depth[members[local[big]]] = WINDOWED
            order2, _, end2 = _runs([tiebreak[members[local[big]]], big_start], order_only=1)
            for a, b in _neighbour_pairs(order2, end2, cap - 1):
                yield members[local[big[a]]], members[local[big[b]]]
            return
        nxt = (chunk + used) % n_chunks
        used += 1
        local = local[big]
        # earlier keys are summarised by the run start they fell in (same run = same values so far)
        keys = [chunk_values(words[members[local]], bounds[nxt], bounds[nxt + 1]), big_start]


def candidate_pairs(
    codes: np.ndarray,
    radius: int,
    *,
    cap: int = 64,
    tiebreak: np.ndarray | None = None,
    stats: CandidateStats | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs (a < b) of items whose codes are within `radius`, found by multi-index hashing.

    Yields (a, b) int64 arrays batch by batch. `tiebreak` (N,) orders members of oversize
    buckets of identical codes (default: item order). Fill `stats` to report the cost.
    """
    if not 0 <= radius < BITS // 2:
        raise ValueError(f"radius must be between 0 and {BITS // 2 - 1}, got {radius}")
    if cap < 2:
        raise ValueError(f"cap must be >= 2, got {cap}")
    stats = stats if stats is not None else CandidateStats()
    n = len(codes)
    words = code_words(codes)
    tiebreak = np.arange(n, dtype=np.float64) if tiebreak is None else np.asarray(tiebreak)
    members = np.arange(n, dtype=np.int64)
    # radius 0 (the paper's identical codes): the code keyed word by word, and one chunk is enough
    bounds = chunk_bounds(radius) if radius else np.array([0, 64, BITS])
    masks = [_chunk_mask(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    n_chunks = len(bounds) - 1
    depth = np.zeros((n_chunks, n), np.uint8)
    for chunk in range(n_chunks if radius else 1):
        found = 0
        for a, b in _chunk_pairs(words, members, bounds, chunk, cap, tiebreak, stats, depth[chunk]):
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            x = words[lo] ^ words[hi]
            keep = (np.bitwise_count(x[:, 0]) + np.bitwise_count(x[:, 1])) <= radius
            if chunk:
                lo, hi, x = lo[keep], hi[keep], x[keep]
                share = np.stack([((x[:, 0] & m0) | (x[:, 1] & m1)) == 0 for m0, m1 in masks], axis=1)
                keep = np.ones(len(lo), bool)
                for earlier in range(chunk):  # emitted already at an earlier chunk: its whole key is shared
                    d = depth[earlier][lo].astype(np.int64)
                    emitted = share[:, earlier] & (d != WINDOWED)
                    for t in range(1, int(d[emitted].max()) if emitted.any() else 0):
                        emitted &= (t >= d) | share[:, (earlier + t) % n_chunks]
                    # a windowed bucket holds every item of one code, in one order, at every chunk
                    keep &= ~(emitted | ((d == WINDOWED) & share.all(axis=1)))
            if keep.any():
                found += int(keep.sum())
                yield lo[keep], hi[keep]
        stats.candidate_pairs += found


def _chunk_mask(start: int, stop: int) -> tuple[np.uint64, np.uint64]:
    """Masks of bits [start, stop) over the (hi, lo) words."""
    value = ((1 << (stop - start)) - 1) << (BITS - stop)
    return np.uint64(value >> 64), np.uint64(value & (2**64 - 1))
