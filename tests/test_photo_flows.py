"""Face and ingestion flows through the CLI, and one pipeline mixing every kind of source."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CELEBA, SHARED
from typer.testing import CliRunner

from flows.cli import app
from preprocessing.lsun import write_lsun_lmdb
from preprocessing.tar_shards import iter_samples

YUNET = SHARED / "models" / "yunet" / "face_detection_yunet_2023mar.onnx"
TINY_IMAGENET_VAL = SHARED / "data" / "tinyimagenet" / "val-2k.parquet"
runner = CliRunner()


@pytest.fixture(scope="module")
def celeba_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("celeba") / "celeba-40.parquet"
    pq.write_table(pq.read_table(CELEBA).slice(0, 40), path)
    return path


@pytest.mark.slow
def test_faces_cli_writes_crops_and_report(prefect_api: None, celeba_subset: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "faces",
            "--photos",
            str(celeba_subset),
            "--work",
            str(tmp_path),
            "--detector",
            "yunet",
            "--model",
            str(YUNET),
            "--part-size",
            "15",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "extract" / "faces_celeba-40"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["photo_path"] for r in manifest} == set(pq.read_table(celeba_subset)["key"].to_pylist())
    assert sum(r["status"] == "ok" for r in manifest) >= 38
    assert "Faces: faces_celeba-40" in (tmp_path / "reports" / "extract-faces-celeba-40.md").read_text()


def test_faces_cli_bad_inputs_exit_cleanly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["faces", "--photos", str(tmp_path / "empty"), "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "holds no files" in result.output
    result = runner.invoke(
        app, ["faces", "--photos", str(CELEBA), "--work", str(tmp_path / "w"), "--detector", "yunet"]
    )
    assert result.exit_code == 2 and "needs model" in result.output
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_ingest_cli_rerun_on_a_grown_folder_extracts_only_the_new_images(
    prefect_api: None, photo_values: list[bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    (folder / "cls").mkdir(parents=True)
    for i, v in enumerate(photo_values[:6]):
        (folder / "cls" / f"{i}.jpg").write_bytes(v)
    args = ["ingest", "--images", str(folder), "--work", str(tmp_path / "w"), "--part-size", "3"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "6 images -> 6 crops" in first.output, first.output
    for i, v in enumerate(photo_values[6:10], 6):
        (folder / "cls" / f"{i}.jpg").write_bytes(v)
    (folder / "cls" / "0.jpg").unlink()
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "10 images -> 9 crops" in second.output, second.output
    report = (tmp_path / "w" / "reports" / "extract-images-imgs.md").read_text()
    for row in ("| new inputs | 4 |", "| new parts | 2 |", "| parts reused | 2 |", "| inputs gone | 1 |"):
        assert row in report, report
    (folder / "cls" / "1.jpg").write_bytes(photo_values[20])
    changed = runner.invoke(app, args)
    assert changed.exit_code == 2 and "1 inputs changed" in changed.output and "--refresh" in changed.output


@pytest.mark.slow
def test_pipeline_mixes_lsun_faces_and_image_tables(
    prefect_api: None, celeba_subset: Path, photo_values: list[bytes], tmp_path: Path
) -> None:
    db = tmp_path / "kitchen_train_lmdb"
    write_lsun_lmdb(db, photo_values[:20])
    images = tmp_path / "val.parquet"
    pq.write_table(pq.read_table(TINY_IMAGENET_VAL).slice(0, 30), images)
    config = {
        "work": str(tmp_path / "work"),
        "sources": [
            {"type": "lsun", "db": str(db)},
            {"type": "faces", "photos": str(celeba_subset), "detector": "yunet", "model": str(YUNET)},
            {"type": "images", "images": str(images), "name": "tin"},
        ],
        "extract": {"size": 32},
        "dedup": {"max_epochs": 3},
        "train": {"enabled": False},
    }
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    ok = set()
    for src in ("kitchen_train", "faces_celeba-40", "tin"):
        rows = pq.read_table(work / "extract" / src / "manifest.parquet").to_pylist()
        ok |= {f"{src}/{r['key']}" for r in rows if r["status"] == "ok"}
    codes = pq.read_table(work / "dedup" / "codes.parquet").to_pylist()
    assert sorted(f"{r['source']}/{r['key']}" for r in codes) == sorted(ok) and len(ok) >= 20 + 38 + 30
    kept = sorted(f"{r['source']}/{r['key']}" for r in codes if r["keep"])
    keys = [k for tar in sorted((work / "shards").glob("*.tar")) for k, _ in iter_samples(tar)]
    assert sorted(keys) == kept
