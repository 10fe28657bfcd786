"""Contact sheets of stored samples, for stage reports and artifacts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from preprocessing.images import SAMPLE_EXT, decode_ppm
from preprocessing.tar_shards import iter_samples


def tile(images: list[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into one grid with a white border."""
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def grid_from_shards(tars: Iterable[Path], n: int = 64) -> np.ndarray | None:
    """The first `n` samples of the given tars as a grid, or None when they hold none."""
    images: list[np.ndarray] = []
    for tar in tars:
        for _, files in iter_samples(Path(tar)):
            images.append(decode_ppm(files[SAMPLE_EXT]))
            if len(images) == n:
                return tile(images)
    return tile(images) if images else None
