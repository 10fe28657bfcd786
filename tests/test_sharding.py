"""Final shards: stock WebDataset compatibility, seeded order, limits, keep flags, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from preprocessing.settings import SettingsError, ShardSettings, parse_settings
from preprocessing.sharding import ShardError, build_shards, read_index
from preprocessing.state import DamagedStateError
from preprocessing.tar_shards import TarShardWriter, iter_samples


@pytest.fixture()
def work(tmp_path: Path, extracted_work: Path) -> Path:
    dst = tmp_path / "work"
    shutil.copytree(extracted_work, dst)
    return dst


def _ok_keys(work: Path) -> list[str]:
    t = pq.read_table(work / "extract" / "photos_train" / "manifest.parquet")
    return sorted(f"photos_train/{r['key']}" for r in t.to_pylist() if r["status"] == "ok")


def test_stock_webdataset_reads_every_kept_sample_once(shards_dir: Path, extracted_work: Path) -> None:
    index = read_index(shards_dir)
    urls = [str(shards_dir / s["url"]) for s in index["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == _ok_keys(extracted_work) and len(set(keys)) == len(keys) == 60
    assert samples[0]["ppm"].shape == (32, 32, 3) and samples[0]["ppm"].dtype == np.uint8
    assert samples[0]["json"]["source"] == "photos_train"
    assert [s["nsamples"] for s in index["shardlist"]] == [25, 25, 10]
    assert index["total"] == 60 and index["resolution"] == 32 and index["sources"] == {"photos_train": 60}


def test_shuffle_is_seeded_and_deterministic(work: Path) -> None:
    def order(seed: int) -> list[str]:
        build_shards(work, ShardSettings(maxcount=100, seed=seed))
        return [k for k, _ in iter_samples(work / "shards" / "train-000000.tar")]

    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c and sorted(a) == sorted(c)
    first = (work / "shards" / "train-000000.tar").read_bytes()
    shutil.rmtree(work / "shards")
    build_shards(work, ShardSettings(maxcount=100, seed=2))
    assert (work / "shards" / "train-000000.tar").read_bytes() == first  # byte-identical rebuild


def test_unchanged_inputs_skip_the_rebuild(work: Path) -> None:
    build_shards(work, ShardSettings(maxcount=30))
    mtime = (work / "shards" / "index.json").stat().st_mtime_ns
    assert build_shards(work, ShardSettings(maxcount=30))["total"] == 60
    assert (work / "shards" / "index.json").stat().st_mtime_ns == mtime
    (work / "shards" / "train-000001.tar").unlink()  # a damaged set is an error, never silently started again
    with pytest.raises(DamagedStateError, match=r"train-000001.tar .* is missing -> rebuild the shards: .* --refresh"):
        build_shards(work, ShardSettings(maxcount=30))
    index = build_shards(work, ShardSettings(maxcount=30), rebuild=True)  # the repair it names
    assert (work / "shards" / "train-000001.tar").exists() and index["version"] == 2  # the history goes on


def test_maxsize_splits_shards(work: Path) -> None:
    index = build_shards(work, ShardSettings(maxsize=20_000))
    assert len(index["shardlist"]) > 2 and sum(s["nsamples"] for s in index["shardlist"]) == 60
    assert all(s["filesize"] < 40_000 for s in index["shardlist"])


def test_dedup_keep_flags_are_honoured(work: Path) -> None:
    keys = [k.split("/", 1)[1] for k in _ok_keys(work)]
    (work / "dedup").mkdir()
    keep = [i % 3 != 0 for i in range(len(keys))]
    pq.write_table(
        pa.table({"key": keys, "source": ["photos_train"] * len(keys), "keep": keep}), work / "dedup" / "codes.parquet"
    )
    index = build_shards(work)
    assert index["total"] == sum(keep)


def test_rebuild_replaces_the_whole_set(work: Path) -> None:
    build_shards(work, ShardSettings(maxcount=10))
    assert len(list((work / "shards").glob("*.tar"))) == 6
    build_shards(work, ShardSettings(maxcount=30))
    names = ["index.json", "samples.parquet", "train-000000.tar", "train-000001.tar", "versions.json"]
    assert sorted(p.name for p in (work / "shards").iterdir()) == names
    assert not list(work.glob(".shards*"))


def test_no_extracted_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no extracted data"):
        build_shards(tmp_path)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("values", [{"maxcount": 0}, {"maxsize": 100}])
def test_bad_limits_are_refused(values: dict) -> None:
    with pytest.raises(SettingsError, match=next(iter(values))):
        parse_settings(ShardSettings, values, "shard settings")


def test_sources_of_different_sizes_are_refused(work: Path) -> None:
    other = work / "extract" / "other"
    shutil.copytree(work / "extract" / "photos_train", other)
    plan = json.loads((other / "plan.json").read_text())
    plan["settings"]["size"] = 64
    (other / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ShardError, match="different sizes"):
        build_shards(work)


def test_missing_staging_sample_is_an_error_not_a_silent_drop(work: Path) -> None:
    src = work / "extract" / "photos_train"
    part = sorted(src.glob("part-*.tar"))[0]
    samples = list(iter_samples(part))
    with TarShardWriter(part) as w:
        for key, files in samples[1:]:
            w.write(key, files)
    with pytest.raises(ShardError, match="missing from the staging shards"):
        build_shards(work)


def test_all_rejected_source_is_a_clear_error(work: Path) -> None:
    path = work / "extract" / "photos_train" / "manifest.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(["rejected"] * t.num_rows))
    pq.write_table(t, path)
    with pytest.raises(ShardError, match="no usable images"):
        build_shards(work)


def test_tar_writer_matches_tarfile_byte_for_byte(tmp_path: Path) -> None:
    import io
    import tarfile

    files = [("abc", {"ppm": b"P6\n1 1\n255\nxyz", "json": b"{}"}), ("d" * 60 + "/" + "k" * 60, {"json": b"[1]"})]
    with TarShardWriter(tmp_path / "ours.tar") as w:
        for key, payload in files:
            w.write(key, payload)
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, payload in files:
            for ext, data in sorted(payload.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    with pytest.raises(ValueError, match="duplicate"), TarShardWriter(tmp_path / "dup.tar") as w:
        w.write("a", {"json": b"1"})
        w.write("a", {"json": b"2"})
    assert not (tmp_path / "dup.tar").exists() and not list(tmp_path.glob(".dup.tar.tmp*"))


def _hashes(shards: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shards.glob("train-*.tar"))}


def test_a_grown_set_appends_a_version_and_leaves_old_shards_alone(work: Path) -> None:
    settings = ShardSettings(maxcount=25)
    first = build_shards(work, settings)
    before = _hashes(work / "shards")
    assert first["version"] == 1 and list(before) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    shutil.copytree(work / "extract" / "photos_train", work / "extract" / "more")  # a new source arrives

    second = build_shards(work, settings)
    after = _hashes(work / "shards")
    assert second["version"] == 2 and second["total"] == 120 and second["added"] == 60
    assert {k: after[k] for k in before} == before  # same names, same bytes
    assert len(after) == 6 and second["sources"] == {"photos_train": 60, "more": 60}
    urls = [str(work / "shards" / s["url"]) for s in second["shardlist"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 120  # stock WebDataset reads every version
    versions = json.loads((work / "shards" / "versions.json").read_text())
    assert [(v["version"], v["added"], v["total"]) for v in versions] == [(1, 60, 60), (2, 60, 120)]
    assert versions[1]["added_per_source"] == {"more": 60} and not versions[1]["rebuild"]
    samples = pq.read_table(work / "shards" / "samples.parquet").to_pylist()
    assert len(samples) == 120 and {r["version"] for r in samples if r["key"].startswith("more/")} == {2}

    mtime = (work / "shards" / "index.json").stat().st_mtime_ns
    assert build_shards(work, settings)["version"] == 2  # nothing new: no new version, nothing written
    assert (work / "shards" / "index.json").stat().st_mtime_ns == mtime


def test_an_append_killed_midway_ends_the_same_as_an_uninterrupted_one(work: Path, tmp_path: Path) -> None:
    settings = ShardSettings(maxcount=25)
    build_shards(work, settings)
    shutil.copytree(work / "extract" / "photos_train", work / "extract" / "more")
    clean = tmp_path / "clean"
    shutil.copytree(work, clean)
    build_shards(clean, settings)
    (work / "shards" / "train-000003.tar").write_bytes(b"half a shard from a killed run")  # no index names it
    build_shards(work, settings)
    assert _hashes(work / "shards") == _hashes(clean / "shards")
    assert pq.read_table(work / "shards" / "samples.parquet").equals(
        pq.read_table(clean / "shards" / "samples.parquet")
    )


def test_a_set_that_lost_samples_is_rebuilt_as_a_new_version(work: Path) -> None:
    build_shards(work, ShardSettings(maxcount=25))
    keys = pq.read_table(work / "extract" / "photos_train" / "manifest.parquet")["key"].to_pylist()
    codes = pa.table(
        {"key": keys, "source": ["photos_train"] * len(keys), "keep": [i % 2 == 0 for i in range(len(keys))]}
    )
    (work / "dedup").mkdir()
    pq.write_table(codes, work / "dedup" / "codes.parquet")
    index = build_shards(work, ShardSettings(maxcount=25))
    assert index["version"] == 2 and index["total"] == 30
    versions = json.loads((work / "shards" / "versions.json").read_text())
    assert [v["rebuild"] for v in versions] == [False, True]
    assert build_shards(work, ShardSettings(maxcount=25), rebuild=True)["version"] == 3
