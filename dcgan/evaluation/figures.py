"""Figure helpers: image grids with a caption above every tile, readable at 32 px sample size."""

from __future__ import annotations

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def caption_strip(text: str, width: int, height: int = 14) -> np.ndarray:
    """A white RGB strip with black text, clipped to `width`."""
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (2, height - 4), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def captioned_grid(
    images: list[np.ndarray | None], captions: list[str], columns: int, cell: int = 64, pad: int = 2
) -> np.ndarray:
    """Tiles of `cell` px (nearest-neighbour upscaled, so pixels stay visible), each under its caption.

    A None image leaves its tile blank, to pad rows of unequal length.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    strip = 14
    rows = (len(images) + columns - 1) // columns
    h, w = cell + strip, cell
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, (img, text) in enumerate(zip(images, captions, strict=True)):
        if img is None:
            continue
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + strip, x : x + w] = caption_strip(text, w, strip)
        grid[y + strip : y + h, x : x + w] = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_NEAREST)
    return grid


def wrap(text: str, width: int, scale: float = 0.35) -> list[str]:
    """`text` in lines that fit `width` px at the captions' font (words are not split)."""
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if lines[-1] and cv2.getTextSize(line, _FONT, scale, 1)[0][0] > width:
            lines.append(word)
        else:
            lines[-1] = line
    return lines


def titled(image: np.ndarray, title: str) -> np.ndarray:
    """The image under its title, wrapped onto as many lines as the image's width needs."""
    strips = [caption_strip(line, image.shape[1], 18) for line in wrap(title, image.shape[1] - 4)]
    return np.concatenate([*strips, image])


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 12) -> np.ndarray:
    """Two RGB images next to each other on white, top-aligned."""
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap :] = right
    return out
