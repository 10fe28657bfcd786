"""Group items by their 128-bit codes: exact match in linear time, or within a Hamming radius.

Radius 0 is the paper's rule: identical codes collide, found with one hash pass (Arrow's
dictionary encoding). Radius R > 0 uses multi-index hashing: split the code into R + 1
chunks; two codes within distance R agree exactly on at least one chunk (pigeonhole), so
only items sharing a chunk value are compared. Its cost is the number of candidate pairs,
returned so callers can report it. Codes with too few active bits (an all-zero code from a
black or flat image) say nothing about content: they are never merged by code, only by
identical pixels, and are counted as degenerate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BITS = 128


@dataclass
class Grouping:
    group: np.ndarray  # (N,) int64 group id (the smallest member index)
    degenerate: np.ndarray  # (N,) bool
    candidate_pairs: int  # pairs compared (0 for radius 0)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                self.parent[max(ri, rj)] = min(ri, rj)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def popcount(codes: np.ndarray) -> np.ndarray:
    return np.unpackbits(codes, axis=1).sum(axis=1)


def _first_of_equal(values: pa.Array) -> np.ndarray:
    """For each item, the index of the first item with an equal value (one hash pass)."""
    idx = pc.dictionary_encode(values).indices.to_numpy(zero_copy_only=False)
    first = np.full(int(idx.max()) + 1 if len(idx) else 0, len(idx), dtype=np.int64)
    np.minimum.at(first, idx, np.arange(len(idx), dtype=np.int64))
    return first[idx]


def _chunk_values(bits: np.ndarray, start: int, stop: int) -> np.ndarray:
    weights = (1 << np.arange(stop - start - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
    return (bits[:, start:stop].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def _within_radius(codes: np.ndarray, a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    x = np.bitwise_xor(codes[a], codes[b])
    return np.unpackbits(x, axis=1).sum(axis=1) <= radius


def group_codes(
    codes: np.ndarray, radius: int = 0, *, content: list[bytes] | None = None, min_bits: int = 1
) -> Grouping:
    """Group (N, 16) uint8 codes; `content` (e.g. pixel hashes) groups the degenerate codes."""
    if codes.ndim != 2 or codes.shape[1] != BITS // 8:
        raise ValueError(f"codes must be (N, {BITS // 8}) uint8, got {codes.shape}")
    if not 0 <= radius < BITS // 2:
        raise ValueError(f"radius must be between 0 and {BITS // 2 - 1}, got {radius}")
    n = len(codes)
    degenerate = popcount(codes) < min_bits if n else np.zeros(0, bool)
    group = np.arange(n, dtype=np.int64)  # degenerate codes stay alone unless their content matches
    live = np.flatnonzero(~degenerate)
    if len(live):
        fixed = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(BITS // 8), len(live), [None, pa.py_buffer(np.ascontiguousarray(codes[live]).tobytes())]
        )
        group[live] = live[_first_of_equal(fixed)]
    dead = np.flatnonzero(degenerate)
    if content is not None and len(dead):
        group[dead] = dead[_first_of_equal(pa.array([content[i] for i in dead], type=pa.binary()))]
    pairs = 0
    if radius > 0 and n:
        uf = _UnionFind(n)
        uf.union_pairs(np.arange(n), group)  # exact matches first
        bits = np.unpackbits(codes[live], axis=1)
        bounds = np.linspace(0, BITS, radius + 2).astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            values = _chunk_values(bits, start, stop)
            order = np.argsort(values, kind="stable")
            sorted_vals = values[order]
            run_starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
            run_ends = np.r_[run_starts[1:], len(order)]
            for s, e in zip(run_starts, run_ends, strict=True):
                if e - s < 2:
                    continue
                members = live[order[s:e]]
                ia, ib = np.triu_indices(len(members), k=1)
                a, b = members[ia], members[ib]
                pairs += len(a)
                close = _within_radius(codes, a, b, radius)
                uf.union_pairs(a[close], b[close])
        group = uf.roots()
    return Grouping(group=group, degenerate=degenerate, candidate_pairs=pairs)


def choose_keepers(group: np.ndarray, rank: list[tuple]) -> np.ndarray:
    """Keep one item per group: the smallest `rank` tuple (e.g. (-pixels, source, key))."""
    best: dict[int, int] = {}
    for i, g in enumerate(group.tolist()):
        j = best.get(g)
        if j is None or rank[i] < rank[j]:
            best[g] = i
    keep = np.zeros(len(group), bool)
    keep[list(best.values())] = True
    return keep
