"""Shared fixtures: real photos from ../shared, LSUN-format databases built from them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from preprocessing.settings import LsunSettings, ShardSettings

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DCGAN_SHARED", ROOT.parent / "shared"))
CELEBA = SHARED / "data" / "celeba" / "celeba-6k.parquet"


def celeba_jpegs(n: int, offset: int = 0) -> list[bytes]:
    """The first n original CelebA JPEG files (178x218) from ../shared."""
    if not CELEBA.exists():
        pytest.fail(f"test data missing: {CELEBA} (set DCGAN_SHARED to the shared folder)")
    table = pq.ParquetFile(CELEBA).read_row_group(0, columns=["image"])
    return table.column("image").to_pylist()[offset : offset + n]


def reencode(data: bytes, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, fmt, **kw)
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_values() -> list[bytes]:
    """60 real photos: JPEG originals and WebP re-encodings, as LSUN holds them."""
    jpegs = celeba_jpegs(60)
    return [j if i % 2 == 0 else reencode(j, "WEBP", quality=80) for i, j in enumerate(jpegs)]


@pytest.fixture(scope="session")
def bad_values() -> dict[str, bytes]:
    """One value per kind of damage LSUN-style input can carry, keyed by the expected reason."""
    good = celeba_jpegs(1, offset=100)[0]
    return {
        "empty": b"",
        "not_an_image": b"<html>404 not found</html>",
        "undecodable": good[: len(good) // 2],
        "too_small": encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "too_many_pixels": encode(Image.new("L", (9000, 8000)), "PNG"),
    }


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for every flow test (starting one costs 5-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (sets offline defaults before Prefect is imported)

    with prefect_test_harness(server_startup_timeout=120):
        yield


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def extracted_work(tmp_path_factory: pytest.TempPathFactory, photo_values: list[bytes]) -> Path:
    """A work directory with 60 real photos extracted at 32 px (no shards yet)."""
    from preprocessing.lsun import extract_lsun, write_lsun_lmdb

    root = tmp_path_factory.mktemp("extracted")
    db = root / "photos_train_lmdb"
    write_lsun_lmdb(db, photo_values)
    extract_lsun(db, root / "work", LsunSettings(size=32, part_size=16), workers=1)
    return root / "work"


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory, extracted_work: Path) -> Path:
    """Final 32 px shards of the 60 photos, in a work directory of their own."""
    import shutil

    from preprocessing.sharding import build_shards

    work = tmp_path_factory.mktemp("sharded") / "work"
    shutil.copytree(extracted_work, work)
    build_shards(work, ShardSettings(maxcount=25))
    return work / "shards"
