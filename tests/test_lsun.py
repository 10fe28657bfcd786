"""LSUN LMDB extraction: compatibility, accounting, bad input, and crash-safe resume."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from preprocessing.lsun import (
    LsunError,
    extract_lsun,
    open_env,
    prepare_extraction,
    resolve_db,
    source_name,
    write_lsun_lmdb,
)
from preprocessing.settings import LsunSettings, SettingsError, ShardSettings, parse_settings
from preprocessing.sharding import build_shards


@pytest.fixture(scope="module")
def lsun_db(tmp_path_factory: pytest.TempPathFactory, photo_values: list[bytes], bad_values: dict) -> Path:
    """An official-layout LMDB: 60 real photos (JPEG + WebP) and one value of each kind of damage."""
    db = tmp_path_factory.mktemp("lsun") / "bedroom_train_lmdb"
    write_lsun_lmdb(db, photo_values + list(bad_values.values()))
    return db


def test_torchvision_reads_our_lmdb_with_same_count(lsun_db: Path, tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import LSUN

    monkeypatch.chdir(tmp_path)  # torchvision caches its key list in the current directory
    dataset = LSUN(str(lsun_db.parent), classes=["bedroom_train"])
    assert len(dataset) == 65
    image, _ = dataset[0]
    assert image.size[0] > 0
    del dataset, image  # py-lmdb allows one open environment per path and process
    gc.collect()


def test_every_key_is_accounted_for_exactly_once(lsun_db: Path, tmp_path: Path, bad_values: dict) -> None:
    manifest = extract_lsun(lsun_db, tmp_path, LsunSettings(size=32, part_size=7), workers=2)
    rows = manifest.to_pylist()
    with open_env(lsun_db).begin() as txn:
        keys = [k.decode() for k in txn.cursor().iternext(values=False)]
    assert sorted(r["key"] for r in rows) == sorted(keys)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 60
    reasons = sorted(r["reason"] for r in rows if r["status"] == "rejected")
    assert reasons == sorted(bad_values)  # each damaged value rejected for its own reason
    assert {r["format"] for r in ok} == {"jpeg", "webp"}
    assert (tmp_path / "extract" / "bedroom_train" / "manifest.parquet").exists()


def test_source_name_and_path_resolution(lsun_db: Path) -> None:
    assert source_name(lsun_db) == "bedroom_train"
    assert resolve_db(lsun_db / "data.mdb") == lsun_db.resolve()


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LsunError, match="not found"):
        prepare_extraction(tmp_path / "nope_lmdb", tmp_path / "work", LsunSettings(size=64))
    assert not (tmp_path / "work").exists()


def test_directory_without_lmdb_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "photos_lmdb").mkdir()
    (tmp_path / "photos_lmdb" / "a.jpg").write_bytes(b"x")
    with pytest.raises(LsunError, match="not an LMDB"):
        prepare_extraction(tmp_path / "photos_lmdb", tmp_path / "work", LsunSettings(size=64))
    (tmp_path / "fake_lmdb").mkdir()
    (tmp_path / "fake_lmdb" / "data.mdb").write_bytes(b"garbage" * 100)
    with pytest.raises(LsunError, match="not a readable LMDB"):
        prepare_extraction(tmp_path / "fake_lmdb", tmp_path / "work", LsunSettings(size=64))
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("size", "kw"), [(4, {}), (5000, {}), (64, {"part_size": 0}), (64, {"max_pixels": 0})])
def test_invalid_parameters_write_nothing(tmp_path: Path, size: int, kw: dict) -> None:
    with pytest.raises(SettingsError, match=next(iter(kw), "size")):
        parse_settings(LsunSettings, {"size": size, **kw}, "LSUN settings")
    assert not (tmp_path / "work").exists()


def test_other_settings_on_an_existing_extraction_are_refused(lsun_db: Path, tmp_path: Path) -> None:
    prepare_extraction(lsun_db, tmp_path, LsunSettings(size=32, part_size=10))
    with pytest.raises(LsunError, match="other .*size"):
        prepare_extraction(lsun_db, tmp_path, LsunSettings(size=64, part_size=10))


def _shard_hashes(work: Path) -> dict[str, str]:
    build_shards(work, ShardSettings(maxcount=16))
    files = sorted(p for p in (work / "shards").iterdir() if p.name != "versions.json")  # that one holds times
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_killed_extraction_resumes_to_identical_shards(lsun_db: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    extract_lsun(lsun_db, clean, LsunSettings(size=32, part_size=5), workers=1)
    expected = _shard_hashes(clean)

    crashed = tmp_path / "crashed"
    script = (
        "import sys, time; from pathlib import Path\n"
        "import preprocessing.lsun as L\n"
        "from preprocessing.settings import LsunSettings\n"
        "orig = L.extract_partition\n"
        "def slow(*a, **k):\n"
        "    r = orig(*a, **k); time.sleep(0.4); return r\n"
        "L.extract_partition = slow\n"
        f"L.extract_lsun({str(lsun_db)!r}, Path({str(crashed)!r}), LsunSettings(size=32, part_size=5), workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    out = crashed / "extract" / "bedroom_train"
    deadline = time.time() + 120
    while len(list(out.glob("part-*.parquet"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert 3 <= done < 13, "the kill must land mid-run"
    assert not (out / "manifest.parquet").exists()

    manifest = extract_lsun(lsun_db, crashed, LsunSettings(size=32, part_size=5), workers=2)
    assert manifest.num_rows == 65 and len(set(manifest.column("key").to_pylist())) == 65
    assert not list(out.glob(".*tmp*")), "temporary files are cleaned up or replaced"
    assert _shard_hashes(crashed) == expected
    assert pq.read_table(out / "manifest.parquet").equals(
        pq.read_table(clean / "extract/bedroom_train/manifest.parquet")
    )


def test_the_demo_database_grows_in_a_process_that_read_it(tmp_path: Path) -> None:
    from preprocessing.demo_data import build_demo_lmdb

    db = build_demo_lmdb(tmp_path / "demo_train_lmdb", 12)
    assert open_env(resolve_db(db)).stat()["entries"] == 15  # 12 records + 3 broken, now open read-only here
    build_demo_lmdb(db, 20)  # the second batch
    assert open_env(resolve_db(db)).stat()["entries"] == 23
