"""Near-duplicate grouping: hash candidates (multi-index, bucket cap), verification, stars, invariance, bad input."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, celeba_jpegs
from PIL import Image
from skimage import data as skdata

from dedup.candidates import CandidateStats, candidate_pairs, chunk_values, code_words, hamming
from dedup.contrast import CONTRAST_FLOOR, ThumbStats, thumbnails
from dedup.grouping import choose_keepers, components, group_near_duplicates, keeper_rank, stars
from dedup.verify import VerifyRule, verify_pairs

CIFAR_TEST = SHARED / "data" / "cifar10" / "test.parquet"
SAME_CODE = np.zeros(16, np.uint8)  # every item one code: every pair is a candidate, verification decides


@pytest.fixture(scope="module")
def cifar_crops() -> np.ndarray:
    images = pq.read_table(CIFAR_TEST).slice(0, 150)["image"].to_pylist()
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


def _planted_codes(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """400 random codes, 100 copies of the first 100 with 1-4 bits flipped, and 150 identical codes."""
    base = rng.integers(0, 256, (400, 16), dtype=np.uint8)
    bits = np.unpackbits(base[:100], axis=1)
    for row in bits:
        row[rng.choice(128, int(rng.integers(1, 5)), replace=False)] ^= 1
    codes = np.concatenate([base, np.packbits(bits, axis=1), np.tile(base[399], (150, 1))])
    return codes, [(i, 400 + i) for i in range(100)]


def _brute(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    i, j = np.triu_indices(len(codes), 1)
    near = hamming(code_words(codes), i, j) <= radius
    return set(zip(i[near].tolist(), j[near].tolist(), strict=True))


def _collect(codes: np.ndarray, radius: int, **kw: object) -> set[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    for a, b in candidate_pairs(codes, radius, **kw):
        assert (a < b).all()
        got += zip(a.tolist(), b.tolist(), strict=True)
    assert len(got) == len(set(got))  # each pair once, across chunks
    return set(got)


def test_chunk_values_are_the_code_bits() -> None:
    codes = np.random.default_rng(0).integers(0, 256, (50, 16), dtype=np.uint8)
    bits = np.unpackbits(codes, axis=1).astype(np.uint64)
    words = code_words(codes)
    for start, stop in ((0, 13), (50, 64), (60, 70), (64, 128), (100, 128), (0, 64)):
        expect = (bits[:, start:stop] * (np.uint64(1) << np.arange(stop - start - 1, -1, -1, dtype=np.uint64))).sum(1)
        assert np.array_equal(chunk_values(words, start, stop), expect), (start, stop)


@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_candidates_without_a_cap_are_exactly_the_pairs_within_the_radius(radius: int) -> None:
    codes, _ = _planted_codes(np.random.default_rng(radius))
    stats = CandidateStats()
    assert _collect(codes, radius, cap=10**6, stats=stats) == _brute(codes, radius)
    assert stats.buckets_split == 0


def test_split_buckets_still_emit_each_pair_once() -> None:
    rng = np.random.default_rng(3)
    codes, _ = _planted_codes(rng)
    dense = np.packbits(
        np.unpackbits(np.repeat(codes[:40], 12, axis=0), axis=1) ^ (rng.random((480, 128)) < 0.02), axis=1
    )
    codes = np.concatenate([codes, dense])
    for cap in (3, 8):
        stats = CandidateStats()
        assert _collect(codes, 6, cap=cap, stats=stats) <= _brute(codes, 6)  # _collect asserts uniqueness
        assert stats.buckets_split > 10


def test_a_bucket_cap_bounds_the_pairs_and_keeps_the_planted_ones() -> None:
    codes, planted = _planted_codes(np.random.default_rng(7))
    stats = CandidateStats()
    got = _collect(codes, 4, cap=16, stats=stats, tiebreak=np.arange(len(codes)))
    assert got <= _brute(codes, 4)
    assert set(planted) <= got  # 1-4 flipped bits, outside the oversize bucket: all found
    identical = {(a, b) for a, b in got if a >= 500 or (a == 399 and b >= 500)}
    assert len(identical) <= 151 * 15  # the 151 identical codes: neighbours only, never all 11,325 pairs
    assert stats.buckets_split >= 1 and stats.buckets_windowed >= 1 and stats.largest_bucket >= 151
    g = group_near_duplicates(
        codes, np.zeros((len(codes), 16, 16, 3), np.uint8), radius=4, cap=16, rule=VerifyRule(low_content_rms=0)
    )
    assert all(g.group[a] == g.group[b] for a, b in planted)
    _, sizes = np.unique(g.group[np.r_[399, 500:650]], return_counts=True)
    assert len(sizes) == 10 and sizes.max() == 16  # stars of a keeper and its 15 neighbours, no longer one chain


def test_bad_radius_cap_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="radius"):
        next(candidate_pairs(np.zeros((2, 16), np.uint8), 64))
    with pytest.raises(ValueError, match="cap"):
        next(candidate_pairs(np.zeros((2, 16), np.uint8), 2, cap=1))
    with pytest.raises(ValueError, match="codes"):
        group_near_duplicates(np.zeros((2, 8), np.uint8), np.zeros((2, 16, 16, 3), np.uint8), radius=0)
    with pytest.raises(ValueError, match="32x32"):
        thumbnails(np.zeros((2, 16, 16, 3), np.uint8))


def _variants(crop: np.ndarray) -> list[np.ndarray]:
    """Brighter, darker, lower and higher contrast, and a JPEG re-encode of one crop."""
    x = crop.astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, "JPEG", quality=60)
    return [
        np.clip(x + 12, 0, 255).astype(np.uint8),
        np.clip(x - 12, 0, 255).astype(np.uint8),
        np.clip((x - x.mean()) * 0.88 + x.mean(), 0, 255).astype(np.uint8),
        np.clip((x - x.mean()) * 1.12 + x.mean(), 0, 255).astype(np.uint8),
        np.asarray(Image.open(buf).convert("RGB")),
    ]


def test_brightness_contrast_and_reencoded_copies_merge_and_different_images_do_not(cifar_crops: np.ndarray) -> None:
    originals = cifar_crops[:100]
    copies = [v for c in originals[:20] for v in _variants(c)]
    crops = np.concatenate([originals, np.stack(copies)])
    g = group_near_duplicates(np.tile(SAME_CODE, (len(crops), 1)), thumbnails(crops), radius=0, cap=10**6)
    family = np.r_[np.arange(100), np.repeat(np.arange(20), 5)]
    for i in range(len(crops)):  # one group per original: its copies in it, nothing else
        assert g.group[i] == g.group[family[i]], i
    assert len(np.unique(g.group)) == 100
    assert g.candidate_pairs == len(crops) * (len(crops) - 1) // 2 and g.rejected_pairs > 0


def test_the_hash_and_verification_ignore_brightness_and_contrast(cifar_crops: np.ndarray) -> None:
    from dedup.autoencoder import AEConfig, encode_bits, train_autoencoder

    model, _ = train_autoencoder(cifar_crops, AEConfig(max_epochs=3))
    crop = cifar_crops[:1]
    brighter = np.clip(crop.astype(np.int16) + 10, 0, 255).astype(np.uint8)
    flatter = np.clip((crop.astype(np.float32) - crop.mean()) * 0.9 + crop.mean(), 0, 255).astype(np.uint8)
    codes = encode_bits(model, np.concatenate([crop, brighter, flatter]))
    distance = np.unpackbits(codes[1:] ^ codes[0], axis=1).sum(1)
    assert distance.max() <= 3  # was a median of 4 and up to 17 bits for +-5..15 levels without normalisation


def _star_fields() -> np.ndarray:
    """Distinct regions of the Hubble deep field (dark, sparse dots), downscaled to 32x32 as the demo's crops are."""
    photo = skdata.hubble_deep_field()
    crops = []
    for side in (64, 128, 256):
        for y in range(0, photo.shape[0] - side + 1, side):
            for x in range(0, photo.shape[1] - side + 1, side):
                crops.append(cv2.resize(photo[y : y + side, x : x + side], (32, 32), interpolation=cv2.INTER_AREA))
    return np.stack(crops)


def test_distinct_low_content_star_fields_never_merge_even_when_every_pair_is_a_candidate() -> None:
    stars = _star_fields()
    jpeg = io.BytesIO()
    Image.fromarray(stars[3]).save(jpeg, "JPEG", quality=90)
    crops = np.concatenate([stars, np.asarray(Image.open(jpeg).convert("RGB"))[None]])
    g = group_near_duplicates(np.tile(SAME_CODE, (len(crops), 1)), thumbnails(crops), radius=0, cap=10**6)
    assert g.low_content.sum() >= 10  # some are flat enough for the near-identical rule
    assert len(np.unique(g.group[:-1])) == len(stars)  # no two different star fields in one group
    assert g.group[-1] == g.group[3]  # while the re-encoded copy of one does merge


def test_low_content_crops_merge_only_on_near_identical_pixels() -> None:
    rng = np.random.default_rng(0)
    flat_levels = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 40, 80, 120, 160, 255)])
    faint_noise = np.clip(128 + rng.normal(0, 1, (20, 32, 32, 3)), 0, 255).astype(np.uint8)
    crops = np.concatenate([flat_levels, faint_noise])
    thumbs = thumbnails(crops)
    assert (ThumbStats.of(thumbs).std < CONTRAST_FLOOR).all()
    g = group_near_duplicates(np.tile(SAME_CODE, (len(crops), 1)), thumbs, radius=0, cap=10**6)
    assert len(np.unique(g.group[:6])) == 6  # flat images of different levels stay apart (no "normalising" them)
    assert len(np.unique(g.group[6:])) == 1 and g.group[6] not in g.group[:6]  # invisible noise: one grey image
    assert g.low_content_pairs == g.candidate_pairs


def test_identical_crops_merge_before_hashing_and_one_item_is_fine(cifar_crops: np.ndarray) -> None:
    crops = np.concatenate([np.tile(cifar_crops[:1], (500, 1, 1, 1)), cifar_crops[1:3]])
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (len(crops), 16), dtype=np.uint8)  # even with different codes
    content = [c.tobytes() for c in crops]
    g = group_near_duplicates(codes, thumbnails(crops), radius=2, content=content)
    assert (g.group[:500] == 0).all() and len(np.unique(g.group)) == 3
    assert g.identical_pairs == 499 and g.candidate_pairs < 3
    one = group_near_duplicates(codes[:1], thumbnails(crops[:1]), radius=8)
    assert one.group.tolist() == [0] and one.candidate_pairs == 0


def test_verify_reports_similarity_and_the_rule_used(cifar_crops: np.ndarray) -> None:
    crops = np.concatenate([cifar_crops[:2], _variants(cifar_crops[0])[:1], np.zeros((2, 32, 32, 3), np.uint8)])
    thumbs = thumbnails(crops)
    v = verify_pairs(thumbs, ThumbStats.of(thumbs), np.array([0, 0, 3]), np.array([2, 1, 4]), VerifyRule())
    assert v.similarity[0] > 0.99 and v.ok.tolist() == [True, False, True]
    assert v.low_content.tolist() == [False, False, True] and v.rms[2] == 0


def test_keepers_are_the_largest_image_then_source_then_key() -> None:
    rank = keeper_rank([100, 50, 0, 0, 200, 200], ["a", "a", "a", "a", "b", "a"], ["k0", "k1", "k2", "k3", "k4", "k5"])
    keep = choose_keepers(np.array([0, 1, 2, 3, 1, 1]), rank)
    assert keep.tolist() == [True, False, True, True, False, True]


def _framings(photo: bytes, steps: int = 11) -> np.ndarray:
    """32x32 crops of one photo, each framed 3 px further right: neighbours match, the ends do not."""
    rgb = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    y, x = (rgb.shape[0] - 128) // 2, (rgb.shape[1] - 128) // 2 - 15
    return np.stack(
        [
            cv2.resize(rgb[y : y + 128, x + dx : x + dx + 128], (32, 32), interpolation=cv2.INTER_AREA)
            for dx in range(0, 3 * steps, 3)
        ]
    )


def test_stars_join_the_first_keeper_linked_and_never_chain() -> None:
    a, b = np.array([0, 1, 2, 0, 4]), np.array([1, 2, 3, 4, 5])
    assert stars(6, a, b).tolist() == [0, 0, 2, 2, 0, 5]  # 1 joins 0; 2 is linked to member 1 only: a keeper
    fixed = np.array([True, True, False, False, False, False])
    assert stars(6, a, b, fixed).tolist() == [0, 1, 1, 3, 0, 5]  # a fixed item stays a keeper even when linked


def test_a_chain_of_framings_splits_into_stars_around_the_keeper() -> None:
    crops = _framings(celeba_jpegs(1)[0], steps=3)  # A, B, C: 0, 3 and 6 px to the right
    thumbs = thumbnails(crops)
    v = verify_pairs(thumbs, ThumbStats.of(thumbs), np.array([0, 1, 0]), np.array([1, 2, 2]), VerifyRule())
    assert v.ok.tolist() == [True, True, False]  # A~B, B~C, but A and C correlate below 0.94
    codes = np.tile(SAME_CODE, (3, 1))
    assert group_near_duplicates(codes, thumbs, radius=0).group.tolist() == [0, 0, 2]  # was one chained group
    middle_first = group_near_duplicates(codes, thumbs, radius=0, rank=np.array([1, 0, 2]))
    assert middle_first.group.tolist() == [1, 1, 1]  # B keeps: both ends verify against it


def test_every_member_verifies_against_its_keeper_on_real_crops(cifar_crops: np.ndarray) -> None:
    framings = np.concatenate([_framings(photo) for photo in celeba_jpegs(3)])
    crops = np.concatenate([framings, cifar_crops[:30], framings[[4, 4, 20]], cifar_crops[[7]]])  # + identical ones
    n = len(crops)
    thumbs = thumbnails(crops)
    stats = ThumbStats.of(thumbs)
    rank = np.random.default_rng(0).permutation(n)
    content = [c.tobytes() for c in crops]
    g = group_near_duplicates(np.tile(SAME_CODE, (n, 1)), thumbs, radius=0, content=content, rank=rank, stats=stats)
    members = np.flatnonzero(g.group != np.arange(n))
    assert verify_pairs(thumbs, stats, members, g.group[members], VerifyRule()).ok.all()
    assert np.array_equal(choose_keepers(g.group, rank), g.group == np.arange(n))  # keeper = lowest rank
    assert g.group[n - 4] == g.group[n - 3] == g.group[4] and g.group[n - 1] == g.group[len(framings) + 7]
    assert g.identical_pairs == 4
    i, j = np.triu_indices(n, 1)
    ok = verify_pairs(thumbs, stats, i, j, VerifyRule()).ok
    assert len(np.unique(components(n, i[ok], j[ok]))) < len(np.unique(g.group)) - 5  # chains would merge far more


def test_items_kept_before_stay_keepers_and_new_items_join_them() -> None:
    crops = _framings(celeba_jpegs(1)[0], steps=3)
    kept_a, kept_b, new_c = crops
    crops = np.stack([kept_a, kept_b, new_c, kept_a, kept_b])  # then identical copies of A and B
    content = [c.tobytes() for c in crops]
    kept = np.array([True, True, False, False, False])
    codes = np.tile(SAME_CODE, (5, 1))
    g = group_near_duplicates(codes, thumbnails(crops), radius=0, content=content, kept=kept, rank=np.arange(5)[::-1])
    assert g.group.tolist() == [0, 1, 1, 0, 1]  # A~B, yet B stays a keeper; C (not ~A) and B's copy join B
    fresh = group_near_duplicates(codes, thumbnails(crops), radius=0, content=content)
    assert fresh.group.tolist() == [0, 0, 2, 0, 0]  # without them, B would join A and C keep alone
