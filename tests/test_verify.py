"""`dcgan-pipeline verify`: a whole work directory passes; each kind of damage is found and named with its repair.

Also: the stages themselves meet damaged state files with one clear error (never a traceback),
and a shard with one flipped byte is refused by training.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dcgan.checkpoint import encode_checkpoint, write_checkpoint
from dcgan.data import CachedImages, DataError, shard_checksums, shard_urls
from dcgan.registry import register_run
from dedup.settings import DedupSettings
from dedup.stage import collect_crops, encode_items, group_items, prepare_autoencoder
from flows.cli import app
from flows.verify import verify_work
from preprocessing.errors import UserError
from preprocessing.settings import ShardSettings
from preprocessing.sharding import build_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, extracted_work: Path) -> Path:
    """60 real photos extracted, deduplicated, sharded, and one registered run with a checkpoint."""
    work = tmp_path_factory.mktemp("verify") / "work"
    shutil.copytree(extracted_work, work)
    settings = DedupSettings(max_epochs=1)
    collect_crops(work)
    checkpoint, _ = prepare_autoencoder(work, settings)
    encode_items(work, checkpoint)
    group_items(work, settings)
    build_shards(work, ShardSettings(maxcount=25))
    run = work / "train" / "run-a"
    write_checkpoint(encode_checkpoint({"step": 1}), run, 1, keep=3)
    register_run(work, "run-a", run, 1, {}, {"protocol": "test", "swd": 1.0})
    return work


@pytest.fixture()
def work(whole: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(whole, copy)
    return copy


def _verify(work: Path, *flags: str) -> tuple[int, str]:
    result = runner.invoke(app, ["verify", "--work", str(work), *flags])
    return result.exit_code, result.output


def test_a_whole_work_directory_is_whole(whole: Path) -> None:
    code, out = _verify(whole, "--data")
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(f"{whole}: whole (")
    found = verify_work(whole, data=True)
    assert not found.problems and not found.notes
    checked = found.checked
    assert checked["sources"] == 1 and checked["shard tars"] == 3 and checked["checkpoints"] == 1
    assert checked["files read"] == checked["staging tars"] + checked["shard tars"] + checked["checkpoints"]
    assert checked["registered runs"] == 1
    code, out = _verify(whole, "--json")
    assert code == 0 and json.loads(out)["whole"] is True


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's image bytes: the tar still parses
    path.write_bytes(bytes(data))


SOURCE = "extract/photos_train"
DAMAGE: list[tuple[str, Callable[[Path], None], bool, str, str]] = [
    # (file, damage, needs --data to be found, stage named, repair command named)
    (f"{SOURCE}/plan.json", _truncate, False, "extract/photos_train", "--refresh"),
    (f"{SOURCE}/inputs.parquet", _empty, False, "extract/photos_train", "--refresh"),
    (f"{SOURCE}/part-000001.parquet", _truncate, False, "extract/photos_train", "--refresh"),
    (f"{SOURCE}/manifest.parquet", _truncate, False, "extract/photos_train", "--refresh"),
    (f"{SOURCE}/part-000000.tar", _truncate, True, "extract/photos_train", "--refresh"),
    ("dedup/codes.parquet", _truncate, False, "dedup", "dedup --work"),
    ("dedup/crops32.npy", _truncate, False, "dedup", "delete it and rerun dcgan-pipeline dedup"),
    ("dedup/hashes.parquet", _empty, False, "dedup", "delete it and rerun dcgan-pipeline dedup"),
    ("dedup/autoencoder.pt", _truncate, False, "dedup", "dedup --work"),
    ("shards/index.json", _truncate, False, "shards", "shard --work"),
    ("shards/versions.json", _empty, False, "shards", "shard --work"),
    ("shards/samples.parquet", _truncate, False, "shards", "shard --work"),
    ("shards/train-000001.tar", _truncate, False, "shards", "shard --work"),
    ("shards/train-000002.tar", _flip, True, "shards", "shard --work"),
    ("train/run-a/checkpoints/step-00000001.pt", _truncate, True, "train/run-a", "--resume"),
    ("train/run-a/checkpoints/sha256.json", _truncate, False, "train/run-a", "next checkpoint"),
    ("models/registry.json", _truncate, False, "registry", "backup"),
]


@pytest.mark.parametrize(("name", "damage", "data", "stage", "repair"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_verify_finds_each_damaged_file_and_names_its_repair(
    work: Path, name: str, damage: Callable[[Path], None], data: bool, stage: str, repair: str
) -> None:
    damage(work / name)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    if data:
        assert _verify(work)[0] == 0  # only the bytes are wrong: a check without --data cannot see it
    code, out = _verify(work, "--data")
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.startswith(f"{stage}: ")]
    assert any(Path(name).name in line and " -> " in line and repair in line for line in lines), out
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before  # nothing changed
    assert json.loads(_verify(work, "--data", "--json")[1])["whole"] is False


def test_a_registered_run_whose_checkpoint_does_not_load_is_named(work: Path) -> None:
    run = work / "train" / "run-b"
    path = write_checkpoint(encode_checkpoint({"step": 2}), run, 2, keep=3)
    register_run(work, "run-b", run, 1, {}, {"protocol": "test", "swd": 2.0})
    _truncate(path)
    code, out = _verify(work)  # no --data: the registry's checkpoints are loaded anyway
    assert code == 2 and "registry: run run-b: cannot read checkpoint" in out and "--run run-b --resume" in out


def test_a_work_directory_of_an_older_version_says_what_to_migrate(work: Path) -> None:
    plan = work / SOURCE / "plan.json"
    old = json.loads(plan.read_text())
    old.pop("format")
    plan.write_text(json.dumps(old))
    for entry in (index := json.loads((work / "shards" / "index.json").read_text()))["shardlist"]:
        entry.pop("sha256")
    (work / "shards" / "index.json").write_text(json.dumps(index))
    code, out = _verify(work, "--data")
    assert code == 2
    assert "extract/photos_train: written by an older version (format 1) -> rerun the extraction" in out
    assert "migrates the source" in out
    assert "note: 3 shard tars without a checksum (written before checksums were recorded)" in out


def test_stale_accounting_is_a_problem_with_its_stage(work: Path) -> None:
    import pyarrow.parquet as pq

    codes = pq.read_table(work / "dedup" / "codes.parquet")
    pq.write_table(codes.slice(1), work / "dedup" / "codes.parquet")  # an item that dedup never saw
    code, out = _verify(work)
    assert code == 2 and "dedup: codes.parquet does not cover the extracted items (1 ok items not hashed" in out
    assert f"-> dcgan-pipeline dedup --work {work}" in out


STAGE_READS: list[tuple[str, Callable[[Path], object], str]] = [
    ("dedup/codes.parquet", lambda w: build_shards(w, ShardSettings(maxcount=25), rebuild=True), "--refresh"),
    ("dedup/codes.parquet", lambda w: group_items(w, DedupSettings(max_epochs=1)), "--refresh"),
    (f"{SOURCE}/manifest.parquet", lambda w: collect_crops(w, full=True), "--refresh"),
    ("dedup/items.parquet", lambda w: collect_crops(w), "delete it and rerun"),
    ("dedup/autoencoder.pt", lambda w: prepare_autoencoder(w, DedupSettings(max_epochs=1)), "--refresh"),
    ("shards/index.json", lambda w: build_shards(w, ShardSettings(maxcount=25)), "shard --work"),
    ("shards/versions.json", lambda w: build_shards(w, ShardSettings(maxcount=24)), "shard --work"),
]


@pytest.mark.parametrize(
    ("name", "stage", "repair"), STAGE_READS, ids=[f"{s[0]}-{i}" for i, s in enumerate(STAGE_READS)]
)
def test_stages_meet_a_damaged_state_file_with_one_clear_error(
    work: Path, name: str, stage: Callable[[Path], object], repair: str
) -> None:
    _truncate(work / name)
    with pytest.raises(UserError) as err:
        stage(work)
    assert str(work / name) in str(err.value) and repair in str(err.value)


def test_training_refuses_a_shard_with_a_flipped_byte(work: Path) -> None:
    shards = work / "shards"
    urls, total = shard_urls(shards, 32)
    _flip(Path(urls[1]))
    with pytest.raises(DataError, match=r"train-000001.tar does not match the sha256 .* -> rebuild the shards"):
        CachedImages(urls, total, seed=0, checksums=shard_checksums(shards))


def test_a_stage_cli_ends_a_damaged_state_in_one_error_line(prefect_api: None, work: Path) -> None:
    _truncate(work / "dedup" / "codes.parquet")
    result = runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "25"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "codes.parquet is damaged" in result.output
    assert "Traceback" not in result.output


def test_a_full_disk_is_one_clear_error_naming_the_file_and_leaves_nothing_partial(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from preprocessing.atomic import NoSpaceError

    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    before = {p: p.read_bytes() for p in (work / "shards").iterdir()}
    monkeypatch.setattr(os, "fsync", full)  # the tar writer and every atomic write fsync before the rename
    with pytest.raises(NoSpaceError, match=r"no space left on the device while writing .*shards.*train-000000.tar"):
        build_shards(work, ShardSettings(maxcount=24))  # other settings: a whole new set is written
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {p: p.read_bytes() for p in (work / "shards").iterdir()} == before  # the old set, untouched
    assert not list(work.glob(".shards.tmp-*")) and not list((work / "shards").glob(".*tmp*"))
    assert _verify(work, "--data")[0] == 0


def test_the_cli_ends_a_full_disk_in_one_error_line(
    prefect_api: None, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "24"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "no space left on the device while writing" in lines[0]
    assert "Traceback" not in result.output


def test_samples_parquet_must_agree_with_the_tars(work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = pq.read_table(work / "shards" / "samples.parquet")
    shard = samples["shard"].to_pylist()
    first, last = shard.index(0), shard.index(max(shard))
    shard[first], shard[last] = shard[last], shard[first]  # two samples said to be in each other's tar
    pq.write_table(samples.set_column(1, "shard", pa.array(shard, pa.int32())), work / "shards" / "samples.parquet")
    assert _verify(work)[0] == 0  # the counts per shard still agree: only reading the tars tells
    code, out = _verify(work, "--data")
    assert code == 2 and "shards: train-000000.tar does not hold the samples its index names -> " in out
    index = json.loads((work / "shards" / "index.json").read_text())
    for entry in index["shardlist"]:  # as written before checksums: the tars themselves are parsed
        del entry["sha256"], entry["keys_sha256"]
    (work / "shards" / "index.json").write_text(json.dumps(index))
    code, out = _verify(work, "--data")
    assert code == 2 and "train-000000.tar does not hold the samples its index names (1 missing, 1 others)" in out
