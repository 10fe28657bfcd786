"""Face and ingestion stages on real photos: detectors, inputs, bad files and accounting."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CELEBA, SHARED, celeba_jpegs, encode
from PIL import Image

from preprocessing.faces import DetectorConfig, DetectorError, FaceDetector
from preprocessing.photo_stages import StageError, run_photo_stage
from preprocessing.photos import PhotoSourceError, open_source
from preprocessing.settings import FacesSettings, IngestSettings, SettingsError, parse_settings
from preprocessing.tar_shards import iter_samples

INGEST32 = IngestSettings(size=32, max_pixels=8_000_000)
YUNET = SHARED / "models" / "yunet" / "face_detection_yunet_2023mar.onnx"
TINY_IMAGENET_VAL = SHARED / "data" / "tinyimagenet" / "val-2k.parquet"


def yunet(part_size: int = 1000) -> FacesSettings:
    return FacesSettings(detector="yunet", model=str(YUNET), max_pixels=8_000_000, part_size=part_size)


def _rotated_with_exif(jpeg: bytes) -> bytes:
    """Pixels stored rotated 90 degrees, with EXIF orientation 6 telling viewers to turn them upright."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB").transpose(Image.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scraped-photo folder: real faces in many encodings plus every kind of bad file."""
    root = tmp_path_factory.mktemp("photos") / "scraped"
    (root / "a" / "b").mkdir(parents=True)
    jpegs = celeba_jpegs(8, offset=200)
    face = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    files = {
        "a/face0.jpg": jpegs[1],
        "a/face1.jpg": jpegs[2],
        "a/b/face2.webp": encode(Image.open(io.BytesIO(jpegs[3])), "WEBP", quality=90),
        "gray.jpg": encode(face.convert("L"), "JPEG", quality=95),
        "cmyk.jpg": encode(Image.open(io.BytesIO(jpegs[4])).convert("CMYK"), "JPEG", quality=95),
        "rgba.png": encode(Image.open(io.BytesIO(jpegs[5])).convert("RGBA"), "PNG"),
        "sixteen.png": encode(Image.fromarray(np.asarray(face.convert("L"), np.uint16) * 257), "PNG"),
        "rotated.jpg": _rotated_with_exif(jpegs[6]),
        "huge.png": encode(Image.new("RGB", (3000, 3000), (90, 90, 90)), "PNG"),
        "tiny.png": encode(Image.new("RGB", (1, 1)), "PNG"),
        "truncated.jpg": jpegs[7][: len(jpegs[7]) // 2],
        "notes.dat": b"this is a text file, not a photo",
        "landscape.jpg": encode(Image.new("RGB", (400, 300), (30, 120, 200)), "JPEG"),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


EXPECTED = {
    "a/face0.jpg": "ok",
    "a/face1.jpg": "ok",
    "a/b/face2.webp": "ok",
    "gray.jpg": "ok",
    "cmyk.jpg": "ok",
    "rgba.png": "ok",
    "sixteen.png": "ok",
    "rotated.jpg": "ok",
    "huge.png": "too_many_pixels",
    "tiny.png": "too_small",
    "truncated.jpg": "undecodable",
    "notes.dat": "not_an_image",
    "landscape.jpg": "no_face",
}


def _outcomes(manifest: pa.Table) -> dict[str, str]:
    by_photo: dict[str, list[str]] = {}
    for r in manifest.to_pylist():
        by_photo.setdefault(r["photo_path"], []).append("ok" if r["status"] == "ok" else r["reason"])
    return {p: "ok" if "ok" in v else v[0] for p, v in by_photo.items()}


def test_faces_stage_accounts_for_every_photo(photo_folder: Path, tmp_path: Path) -> None:
    settings = yunet(part_size=4)
    manifest = run_photo_stage(photo_folder, tmp_path, "faces_scraped", settings, workers=2)
    assert _outcomes(manifest) == EXPECTED
    ok = manifest.filter(pa.compute.equal(manifest["status"], "ok")).to_pylist()
    assert Counter(r["photo_path"] for r in ok) == Counter({p: 1 for p, v in EXPECTED.items() if v == "ok"})
    for r in ok:
        assert r["key"] == f"{r['photo_key']}_{r['face_index']}" and r["detector"] == "yunet"
        assert min(r["box_w"], r["box_h"]) >= 64 and r["score"] > 0.7
    rotated = next(r for r in ok if r["photo_path"] == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (218, 178)  # stored sideways; detected after EXIF turn
    assert rotated["box_x"] + rotated["box_w"] <= 178 and rotated["box_y"] + rotated["box_h"] <= 218
    samples = dict(
        s for tar in sorted((tmp_path / "extract" / "faces_scraped").glob("part-*.tar")) for s in iter_samples(tar)
    )
    assert sorted(samples) == sorted(r["key"] for r in ok)
    meta = json.loads(samples[rotated["key"]]["json"])
    assert meta["photo_path"] == "rotated.jpg" and meta["box_w"] == rotated["box_w"]


def test_tar_input_gives_the_same_keys_as_the_folder(photo_folder: Path, tmp_path: Path) -> None:
    tar_path = tmp_path / "scraped.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(photo_folder.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=f.relative_to(photo_folder).as_posix())
    settings = yunet(part_size=5)
    from_tar = run_photo_stage(tar_path, tmp_path / "t", "faces_tar", settings, workers=1)
    from_dir = run_photo_stage(photo_folder, tmp_path / "d", "faces_dir", settings, workers=1)
    assert sorted(from_tar["key"].to_pylist()) == sorted(from_dir["key"].to_pylist())
    assert _outcomes(from_tar) == EXPECTED


def test_haar_works_offline_and_finds_celeba_faces(tmp_path: Path) -> None:
    table = pq.read_table(CELEBA).slice(0, 24)
    pq.write_table(table, tmp_path / "celeba.parquet")
    settings = FacesSettings(max_pixels=8_000_000)
    manifest = run_photo_stage(tmp_path / "celeba.parquet", tmp_path, "faces_celeba", settings, workers=1)
    ok = manifest.filter(pa.compute.equal(manifest["status"], "ok"))
    assert len(set(ok["photo_key"].to_pylist())) >= 20  # one face per aligned CelebA photo, nearly always
    assert set(manifest["photo_path"].to_pylist()) == set(table["key"].to_pylist())  # joins back by table key


def test_detector_downscale_keeps_boxes_in_source_pixels() -> None:
    rgb = np.asarray(Image.open(io.BytesIO(celeba_jpegs(1)[0])).convert("RGB"))
    big = np.asarray(Image.fromarray(rgb).resize((178 * 4, 218 * 4), Image.BICUBIC))
    small_faces = FaceDetector(DetectorConfig(kind="yunet", model=str(YUNET), min_face=32)).detect(rgb)
    big_faces = FaceDetector(DetectorConfig(kind="yunet", model=str(YUNET), min_face=128)).detect(
        big
    )  # detected at 1/4 scale
    assert len(small_faces) == len(big_faces) == 1
    a, b = small_faces[0], big_faces[0]
    assert abs(b.x / 4 - a.x) < 6 and abs(b.w / 4 - a.w) < 8


def test_detector_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="needs --model"):
        FaceDetector(DetectorConfig(kind="yunet"))
    with pytest.raises(DetectorError, match="not found"):
        FaceDetector(DetectorConfig(kind="yunet", model=str(tmp_path / "none.onnx")))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(DetectorError, match="cannot load"):
        FaceDetector(DetectorConfig(kind="yunet", model=str(tmp_path / "bad.onnx")))
    with pytest.raises(DetectorError, match="unknown detector"):
        FaceDetector(DetectorConfig(kind="mtcnn"))


def test_table_without_expected_columns_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1], "pixels": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(PhotoSourceError, match=r"lacks column\(s\) \['image', 'key'\]"):
        run_photo_stage(tmp_path / "bad.parquet", tmp_path / "w", "x", INGEST32, workers=1)
    assert not (tmp_path / "w" / "extract" / "x").exists()


def test_empty_folder_and_missing_path_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhotoSourceError, match="holds no files"):
        run_photo_stage(tmp_path / "empty", tmp_path / "w", "x", INGEST32, workers=1)
    with pytest.raises(PhotoSourceError, match="not found"):
        open_source(tmp_path / "nowhere")


def test_ingest_folder_tree_keeps_class_labels(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, shade in (("cat", 40), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            encoded = encode(Image.new("RGB", (48 + i, 64), (shade, shade, shade)), "JPEG", quality=95)
            (root / cls / f"{i}.jpg").write_bytes(encoded)
    manifest = run_photo_stage(root, tmp_path / "w", "images_imgs", INGEST32, workers=1)
    assert Counter(manifest["label"].to_pylist()) == {"cat": 3, "dog": 3}
    samples = [s for tar in (tmp_path / "w" / "extract" / "images_imgs").glob("part-*.tar") for s in iter_samples(tar)]
    assert len(samples) == 6
    for _, files in samples:
        meta = json.loads(files["json"])
        pixel = np.asarray(Image.open(io.BytesIO(files["ppm"])))
        assert pixel.shape == (32, 32, 3)
        assert abs(int(pixel.mean()) - (40 if meta["label"] == "cat" else 200)) < 4


def test_ingest_tiny_imagenet_table_keeps_labels(tmp_path: Path) -> None:
    table = pq.read_table(TINY_IMAGENET_VAL).slice(0, 30)
    pq.write_table(table, tmp_path / "val.parquet")
    manifest = run_photo_stage(tmp_path / "val.parquet", tmp_path / "w", "tin", INGEST32, workers=1)
    assert manifest.num_rows == 30 and set(manifest["status"].to_pylist()) == {"ok"}
    assert manifest["label"].to_pylist() == [str(v) for v in table["label"].to_pylist()]


def test_rerun_with_other_settings_is_refused(photo_folder: Path, tmp_path: Path) -> None:
    run_photo_stage(photo_folder, tmp_path, "x", INGEST32, workers=1)
    with pytest.raises(StageError, match="other .*size"):
        run_photo_stage(photo_folder, tmp_path, "x", IngestSettings(size=64, max_pixels=8_000_000), workers=1)


@pytest.mark.parametrize(
    ("model", "values", "field"),
    [
        (IngestSettings, {"size": 4}, "size"),
        (FacesSettings, {"margin": 2.0}, "margin"),
        (FacesSettings, {"min_face": 2}, "min_face"),
        (FacesSettings, {"detector": "yunet"}, "model"),
        (FacesSettings, {"model": "/nowhere/yunet.onnx"}, "model"),
    ],
)
def test_invalid_stage_parameters_are_refused(model: type, values: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        parse_settings(model, values, "stage settings")
