"""Decoding untrusted image bytes: formats, modes, damage and the pixel cap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import celeba_jpegs, encode, reencode
from PIL import Image

from preprocessing.images import ImageRejected, center_crop_resize, decode_ppm, decode_rgb, encode_ppm, sniff_format


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return celeba_jpegs(1)[0]


def test_sniff_ignores_names_and_reads_magic(jpeg: bytes) -> None:
    assert sniff_format(jpeg) == "jpeg"
    assert sniff_format(reencode(jpeg, "WEBP")) == "webp"
    assert sniff_format(reencode(jpeg, "PNG")) == "png"
    assert sniff_format(b"GIF89a....") == "gif"
    assert sniff_format(b"hello world") is None
    assert sniff_format(b"") is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_real_photo_decodes_in_every_format(jpeg: bytes, fmt: str) -> None:
    data = jpeg if fmt == "JPEG" else reencode(jpeg, fmt)
    rgb, name, (w, h) = decode_rgb(data)
    assert (w, h) == (178, 218) and rgb.shape == (218, 178, 3) and rgb.dtype == np.uint8
    assert name == fmt.lower()
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)
    tolerance = 2 if fmt in ("JPEG", "PNG") else 12  # WebP is lossy on top of the JPEG
    assert np.abs(rgb.astype(np.int16) - reference).mean() < tolerance


def test_reduced_jpeg_decoding_keeps_enough_pixels_and_matches_full_decode() -> None:
    big = Image.open(io.BytesIO(celeba_jpegs(1)[0])).convert("RGB").resize((712, 872), Image.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    reduced, _, size = decode_rgb(data, target_short_side=64)
    assert size == (712, 872)
    assert min(reduced.shape[:2]) >= 64 and min(reduced.shape[:2]) < 712  # decoded at 1/8..1/2 scale
    full, _, _ = decode_rgb(data)
    a = center_crop_resize(reduced, 64).astype(np.int16)
    b = center_crop_resize(full, 64).astype(np.int16)
    assert np.abs(a - b).mean() < 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"not an image at all", "not_an_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "undecodable"),
    ],
)
def test_damaged_values_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as err:
        decode_rgb(data)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_truncated_files_are_rejected_not_half_grey(jpeg: bytes, fmt: str) -> None:
    data = jpeg if fmt == "JPEG" else reencode(jpeg, fmt)
    with pytest.raises(ImageRejected) as err:
        decode_rgb(data[: len(data) // 2], target_short_side=32)
    assert err.value.reason == "undecodable"


def test_tiny_image_rejected_by_min_side_and_kept_without_it() -> None:
    one = encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_rgb(one, min_side=32)
    assert err.value.reason == "too_small"
    rgb, _, _ = decode_rgb(one)
    assert center_crop_resize(rgb, 8).shape == (8, 8, 3)


def test_pixel_cap_rejects_before_decoding() -> None:
    bomb = encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_rgb(bomb, max_pixels=20_000_000)
    assert err.value.reason == "too_many_pixels"


def test_grayscale_becomes_three_equal_channels(jpeg: bytes) -> None:
    gray = encode(Image.open(io.BytesIO(jpeg)).convert("L"), "JPEG", quality=95)
    rgb, _, _ = decode_rgb(gray)
    assert rgb.shape == (218, 178, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_cmyk_jpeg_converts_to_matching_rgb(jpeg: bytes) -> None:
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=95)
    rgb, _, _ = decode_rgb(cmyk)
    assert np.abs(rgb.astype(np.int16) - np.asarray(photo, dtype=np.int16)).mean() < 6


def test_rgba_is_composited_on_white() -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 20, 40))
    rgb, _, _ = decode_rgb(encode(img, "PNG"))
    assert tuple(rgb[5, 5]) == (0, 0, 255)
    assert tuple(rgb[5, 30]) == (255, 255, 255)  # transparent red shows as background white


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (8, 1))
    rgb, _, _ = decode_rgb(encode(Image.fromarray(ramp), "PNG"))  # uint16 -> mode I;16
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert 120 < rgb[0, 32, 0] < 136  # mid-grey, not saturated white


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 40))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    rgb, _, size = decode_rgb(data)
    assert size == (60, 40) and rgb.shape == (60, 40, 3)
    assert rgb[5, 20].mean() > 200 and rgb[55, 20].mean() < 50  # white half is now on top


def test_center_crop_resize_takes_the_middle_square() -> None:
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255
    out = center_crop_resize(img, 32)
    assert out.shape == (32, 32, 3) and out.min() == 255


def test_ppm_samples_round_trip_losslessly_and_read_as_standard_ppm() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    data = encode_ppm(rgb)
    assert np.array_equal(decode_ppm(data), rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), rgb)  # any PPM reader agrees
    with pytest.raises(ValueError, match="truncated"):
        decode_ppm(data[:-5])


def test_header_probe_agrees_with_pil_and_routes_odd_files_to_pil(jpeg: bytes) -> None:
    from preprocessing.images import _probe

    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    translucent = photo.convert("RGBA")
    translucent.putalpha(200)
    cases = {
        "baseline": (jpeg, True),
        "progressive": (encode(photo, "JPEG", progressive=True), True),
        "gray": (encode(photo.convert("L"), "JPEG"), True),
        "cmyk": (encode(photo.convert("CMYK"), "JPEG"), False),
        "truncated": (jpeg[:-200], False),
        "webp lossy": (encode(photo, "WEBP", quality=80), True),
        "webp lossless": (encode(photo, "WEBP", lossless=True), True),
        "webp alpha": (encode(translucent, "WEBP", quality=80), False),
    }
    for name, (data, plain) in cases.items():
        w, h, is_plain = _probe(data, sniff_format(data))
        assert (w, h) == (178, 218), name
        assert is_plain == plain, name
        rgb, _, _ = decode_rgb(data) if name not in ("truncated", "webp alpha") else (None, None, None)
        if rgb is not None:
            reference = photo.convert("L").convert("RGB") if name == "gray" else photo
            assert np.abs(rgb.astype(int) - np.asarray(reference, int)).mean() < 12, name
