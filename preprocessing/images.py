"""Decode untrusted image bytes into RGB arrays and make square training crops.

Every source (LSUN values, scraped photos, image tables) goes through `decode_rgb`, so
format sniffing, the pixel cap, mode conversion and EXIF orientation live in one place.
A bad input raises `ImageRejected` with a short machine-readable reason that ends up in
the stage manifest; it never crashes a stage.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

# We enforce our own pixel cap before decoding; PIL's bomb warning would only add noise.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 64_000_000

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class ImageRejected(ValueError):
    """An input that cannot become a training image; `reason` is a stable short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """Return the image format named by the magic bytes, or None; file names are never trusted."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, 16-bit is scaled down."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        peak = 65535 if mode != "I" else max(int(arr.max()), 1)
        arr8 = (arr.astype(np.float32) * (255.0 / peak) + 0.5).clip(0, 255).astype(np.uint8)
        return np.repeat(arr8[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _decode_fast(
    data: bytes, fmt: str, mode: str, short: int, target_short_side: int | None, exif: bool
) -> np.ndarray | None:
    """OpenCV decode for the common cases (RGB/gray JPEG, opaque WebP): 1.3-1.6x faster than PIL.

    JPEG uses reduced-size DCT decoding (IMREAD_REDUCED_*) when the target is much smaller.
    Returns None where PIL must handle it: other modes, alpha, or a JPEG without its end
    marker (OpenCV would silently return a half-grey truncated image).
    """
    if fmt == "jpeg" and mode in ("RGB", "L") and data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        flag = cv2.IMREAD_COLOR
        if target_short_side:
            for factor, reduced in (
                (8, cv2.IMREAD_REDUCED_COLOR_8),
                (4, cv2.IMREAD_REDUCED_COLOR_4),
                (2, cv2.IMREAD_REDUCED_COLOR_2),
            ):
                if short // factor >= target_short_side:
                    flag = reduced
                    break
    elif fmt == "webp" and mode == "RGB":
        flag = cv2.IMREAD_COLOR
    else:
        return None
    if not exif:
        flag |= cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise ImageRejected("undecodable", f"OpenCV could not decode this {fmt}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_rgb(
    data: bytes,
    *,
    min_side: int = 1,
    target_short_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif: bool = True,
) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decode image bytes to an RGB uint8 array.

    `target_short_side` lets JPEG use reduced-size DCT decoding when the final
    crop is much smaller than the source: the result keeps a short side >= that target.
    Returns (array, format, (source width, source height)).
    """
    if not data:
        raise ImageRejected("empty", "zero-length value")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected("not_an_image", f"unknown magic bytes {data[:8].hex()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height} exceeds cap {max_pixels}")
            if min(width, height) < min_side:
                raise ImageRejected("too_small", f"{width}x{height}, short side < {min_side}")
            rgb = _decode_fast(data, fmt, img.mode, min(width, height), target_short_side, exif)
            if rgb is None:
                img.load()
                if exif:
                    img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageRejected:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}") from exc
    return rgb, fmt, (width, height)


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to `size` (area filter when shrinking = antialiased)."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG for stored crops, so later stages never stack JPEG losses."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by `encode_png` back to RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt PNG sample")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
