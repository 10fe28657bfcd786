"""Build the embedded demo dataset: an LSUN-format LMDB cut from photos that pip installs.

scikit-image ships a handful of real colour photographs inside its wheel. Random crops of
them (random scale, position and flip), resized to a 256-px short side like LSUN and
encoded as JPEG or WebP, give a few thousand realistic records with no download. A few
deliberately broken records show the rejection accounting at work.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image
from skimage import data as skdata

from preprocessing.lsun import close_env, write_lsun_lmdb

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")
BROKEN = (b"", b"this is not an image", None)  # None: a truncated JPEG, made below


def demo_photos() -> list[np.ndarray]:
    """The RGB photographs bundled in the scikit-image wheel (no network access)."""
    photos = [getattr(skdata, name)() for name in PHOTOS]
    photos.append(skdata.stereo_motorcycle()[0])
    return [p[..., :3] for p in photos if p.ndim == 3]


def demo_values(records: int, seed: int = 0) -> list[bytes]:
    """The first `records` demo crops, JPEG and WebP in turn; a larger count extends the same sequence."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in demo_photos()]
    values: list[bytes] = []
    for i in range(records):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.3, 0.9))
        aspect = rng.uniform(1.0, 1.33)
        cw, ch = min(w, int(side * aspect)), side
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch)).resize((int(256 * cw / ch), 256), Image.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        if i % 2:
            crop.save(buf, "WEBP", quality=80)
        else:
            crop.save(buf, "JPEG", quality=85)
        values.append(buf.getvalue())
    return values


def build_demo_lmdb(db_dir: Path, records: int = 3000, seed: int = 0) -> Path:
    """Write `records` crops (plus three broken values) as `db_dir`, an LSUN-layout LMDB.

    A database built with fewer records grows: the records after the ones it holds are added
    under new keys, as new photos arrive at a scraper (the demo's second batch).
    """
    if records < 1:
        raise ValueError(f"records must be >= 1, got {records}")
    if (db_dir / "data.mdb").exists():
        _grow(db_dir, records, seed)
        return db_dir
    values = demo_values(records, seed)
    for broken in BROKEN:
        values.append(values[0][: len(values[0]) // 3] if broken is None else broken)
    write_lsun_lmdb(db_dir, values)
    return db_dir


def _grow(db_dir: Path, records: int, seed: int) -> None:
    close_env(db_dir)  # a read-only handle of an earlier extraction in this process
    env = lmdb.open(str(db_dir), subdir=True)
    try:
        held = env.stat()["entries"] - len(BROKEN)
        if records <= held:
            return
        new = demo_values(records, seed)[held:]
        env.set_mapsize(env.info()["map_size"] + 2 * sum(len(v) + 128 for v in new))
        with env.begin(write=True) as txn:
            for i, value in enumerate(new, start=held):
                txn.put(hashlib.sha1(f"demo-{seed}-{i}".encode() + value).hexdigest().encode("ascii"), value)
    finally:
        env.close()
