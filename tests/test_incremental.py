"""A source that grows: reruns extract only new inputs, as new parts; finished parts never change.

One engine (preprocessing.extraction) serves LMDBs, photo folders, tars and tables, so these
invariants are checked on the kinds through their public stage functions: every input accounted
for exactly once after any sequence of grow / shrink / rerun / kill, old parts byte-identical,
gone inputs marked, changed inputs refused, and a rerun with nothing new writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import CELEBA, celeba_jpegs

from preprocessing.lsun import LsunError, extract_lsun, forget_envs, open_env, prepare_extraction, write_lsun_lmdb
from preprocessing.photo_stages import StageError, run_photo_stage
from preprocessing.photos import INPUT_SCHEMA
from preprocessing.settings import IngestSettings, LsunSettings, ShardSettings
from preprocessing.sharding import build_shards
from preprocessing.tar_shards import iter_samples

INGEST = IngestSettings(size=32, part_size=4)
LSUN = LsunSettings(size=32, part_size=5)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return celeba_jpegs(40, offset=300)


def _add(folder: Path, jpegs: list[bytes], names: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        (folder / f"p{i:03d}.jpg").write_bytes(jpegs[i])


def _files(out: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file of an extraction directory."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(out.iterdir())}


def _parts(out: Path) -> dict[str, tuple[int, str]]:
    return {k: v for k, v in _files(out).items() if k.startswith("part-")}


def _accounting(manifest: pa.Table, identity: str) -> dict[str, str]:
    """identity -> 'ok' / 'gone' / reason; fails when an input has rows of two outcomes or appears twice."""
    outcome: dict[str, str] = {}
    for r in manifest.to_pylist():
        value = r["status"] if r["status"] in ("ok", "gone") else r["reason"]
        assert outcome.setdefault(r[identity], value) == value
    assert len(set(manifest["key"].to_pylist())) == manifest.num_rows
    return outcome


def _photo_paths(manifest: pa.Table, status: str) -> set[str]:
    return set(manifest.filter(pc.equal(manifest["status"], status))["photo_path"].to_pylist())


def test_grown_folder_extracts_only_new_photos_as_new_parts(jpegs: list[bytes], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _add(folder, jpegs, range(10))
    run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=1)
    out = tmp_path / "w" / "extract" / "x"
    old = _parts(out)
    assert len(old) == 6  # 3 parts of <= 4 photos

    _add(folder, jpegs, range(10, 15))
    manifest = run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=2)
    now = _parts(out)
    assert {k: now[k] for k in old} == old  # old parts: same bytes, never rewritten
    assert sorted(set(now) - set(old)) == [f"part-00000{i}.{e}" for i in (3, 4) for e in ("parquet", "tar")]
    assert _photo_paths(manifest, "ok") == {f"p{i:03d}.jpg" for i in range(15)}
    new_rows = manifest.filter(pc.greater_equal(manifest["part"], 3))
    assert set(new_rows["photo_path"].to_pylist()) == {f"p{i:03d}.jpg" for i in range(10, 15)}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == 2 and plan["parts"] == 5 and plan["inputs"] == 15

    # the same rows (but for the part number) as one run over the grown folder
    fresh = run_photo_stage(folder, tmp_path / "fresh", "x", INGEST, workers=1)
    key = lambda t: sorted(t.drop_columns(["part"]).to_pylist(), key=lambda r: r["key"])  # noqa: E731
    assert key(fresh) == key(manifest)


def test_rerun_with_nothing_new_writes_nothing(jpegs: list[bytes], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _add(folder, jpegs, range(6))
    run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=1)
    db = tmp_path / "bed_train_lmdb"
    write_lsun_lmdb(db, jpegs[:7])
    extract_lsun(db, tmp_path / "w", LSUN, workers=1)
    before = {s: _files(tmp_path / "w" / "extract" / s) for s in ("x", "bed_train")}
    run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=1)
    extract_lsun(db, tmp_path / "w", LSUN, workers=1)
    assert {s: _files(tmp_path / "w" / "extract" / s) for s in ("x", "bed_train")} == before


def test_gone_photos_are_kept_marked_and_left_out_of_shards(jpegs: list[bytes], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _add(folder, jpegs, range(9))
    work = tmp_path / "w"
    run_photo_stage(folder, work, "x", INGEST, workers=1)
    out = work / "extract" / "x"
    old = _parts(out)
    kept = (folder / "p001.jpg").stat()
    (folder / "p001.jpg").unlink()
    (folder / "p007.jpg").unlink()
    _add(folder, jpegs, range(9, 11))
    manifest = run_photo_stage(folder, work, "x", INGEST, workers=1)
    assert {k: v for k, v in _parts(out).items() if k in old} == old
    assert _photo_paths(manifest, "gone") == {"p001.jpg", "p007.jpg"}
    gone = manifest.filter(pc.equal(manifest["status"], "gone")).to_pylist()
    assert {(r["reason"], r["detail"]) for r in gone} == {("removed_from_source", "was ok")}
    assert json.loads((out / "plan.json").read_text())["gone"] == 2
    assert set(_accounting(manifest, "photo_key").values()) == {"ok", "gone"} and manifest.num_rows == 11

    build_shards(work, ShardSettings(maxcount=100))
    shard_keys = [k for tar in sorted((work / "shards").glob("*.tar")) for k, _ in iter_samples(tar)]
    assert sorted(shard_keys) == sorted(f"x/{k}" for k in manifest.filter(pc.equal(manifest["status"], "ok"))["key"])

    _add(folder, jpegs, [1])  # the same file is back (same size and mtime): it is ok again
    os.utime(folder / "p001.jpg", ns=(kept.st_atime_ns, kept.st_mtime_ns))
    again = run_photo_stage(folder, work, "x", INGEST, workers=1)
    assert _photo_paths(again, "gone") == {"p007.jpg"}


def test_changed_photo_under_an_old_name_is_refused(jpegs: list[bytes], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    _add(folder, jpegs, range(5))
    run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=1)
    out = tmp_path / "w" / "extract" / "x"
    before = _files(out)
    (folder / "p002.jpg").write_bytes(jpegs[20])
    _add(folder, jpegs, range(5, 7))
    with pytest.raises(StageError, match=r"1 inputs changed .*p002\.jpg.*--refresh"):
        run_photo_stage(folder, tmp_path / "w", "x", INGEST, workers=1)
    assert _files(out) == before  # refused before anything is written


def test_table_replaced_by_a_longer_one_and_by_changed_rows(tmp_path: Path) -> None:
    celeba = pq.read_table(CELEBA).slice(0, 14)
    path = tmp_path / "t.parquet"
    pq.write_table(celeba.slice(0, 9), path, row_group_size=4)
    run_photo_stage(path, tmp_path / "w", "t", INGEST, workers=1)
    out = tmp_path / "w" / "extract" / "t"
    old = _parts(out)
    pq.write_table(celeba, path, row_group_size=4)  # the same rows first, then 5 new ones
    manifest = run_photo_stage(path, tmp_path / "w", "t", INGEST, workers=1)
    assert {k: v for k, v in _parts(out).items() if k in old} == old
    assert sorted(manifest["photo_path"].to_pylist()) == sorted(celeba["key"].to_pylist())
    assert set(manifest.filter(pc.greater_equal(manifest["part"], 3))["photo_path"].to_pylist()) == set(
        celeba.slice(9)["key"].to_pylist()
    )
    before = _files(out)
    images = celeba["image"].to_pylist()
    images[3], images[4] = images[4], images[3]  # two old keys now hold other photos
    pq.write_table(celeba.set_column(celeba.schema.get_field_index("image"), "image", pa.array(images)), path)
    with pytest.raises(StageError, match="2 inputs changed"):
        run_photo_stage(path, tmp_path / "w", "t", INGEST, workers=1)
    assert _files(out) == before


def _writable(db: Path) -> lmdb.Environment:
    """Close this process's cached read-only handle first: py-lmdb allows one environment per path."""
    open_env(db.resolve()).close()
    forget_envs()
    return lmdb.open(str(db), map_size=1 << 28)


def _lmdb_put(db: Path, items: dict[str, bytes]) -> None:
    env = _writable(db)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode(), v)
    env.close()


def test_lmdb_with_new_keys_inside_old_ranges_gets_new_parts(jpegs: list[bytes], tmp_path: Path) -> None:
    db = tmp_path / "bed_train_lmdb"
    first = write_lsun_lmdb(db, jpegs[:12])
    extract_lsun(db, tmp_path / "w", LSUN, workers=1)
    out = tmp_path / "w" / "extract" / "bed_train"
    old = _parts(out)
    added = {hashlib.sha1(f"new{i}".encode()).hexdigest(): v for i, v in enumerate(jpegs[12:20])}
    lo, hi = min(first), max(first)
    assert any(lo < k < hi for k in added), "some new keys fall inside the old key ranges"
    _lmdb_put(db, added)

    manifest = extract_lsun(db, tmp_path / "w", LSUN, workers=2)
    assert {k: v for k, v in _parts(out).items() if k in old} == old
    assert sorted(manifest["key"].to_pylist()) == sorted(first + list(added))
    new = manifest.filter(pc.greater_equal(manifest["part"], 3))
    assert sorted(new["key"].to_pylist()) == sorted(added) and set(new["status"].to_pylist()) == {"ok"}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["parts"] == 5 and plan["kind"] == "lsun" and "fingerprint" not in plan["settings"]

    before = _files(out)
    _lmdb_put(db, {first[4]: jpegs[30]})  # another value under an old key
    with pytest.raises(LsunError, match="1 inputs changed"):
        prepare_extraction(db, tmp_path / "w", LSUN)
    assert _files(out) == before


def test_lmdb_keys_removed_are_reported_gone(jpegs: list[bytes], tmp_path: Path) -> None:
    db = tmp_path / "bed_train_lmdb"
    keys = write_lsun_lmdb(db, jpegs[:8])
    extract_lsun(db, tmp_path / "w", LSUN, workers=1)
    env = _writable(db)
    with env.begin(write=True) as txn:
        txn.delete(keys[2].encode())
    env.close()
    _, plan = prepare_extraction(db, tmp_path / "w", LSUN)
    assert (plan.gone, plan.newly_gone, plan.new_inputs, plan.todo) == (1, 1, 0, [])
    manifest = extract_lsun(db, tmp_path / "w", LSUN, workers=1)
    assert _accounting(manifest, "key") == {k: "gone" if k == keys[2] else "ok" for k in keys}


def _old_format(out: Path, kind: str) -> None:
    """Rewrite a work directory as the code before format 2 left it (plan.json, inputs.parquet)."""
    plan = json.loads((out / "plan.json").read_text())
    index = pq.read_table(out / "inputs.parquet")
    if kind == "lsun":
        settings = {**plan["settings"], "fingerprint": plan["source_fingerprint"]}
        raws = index["raw"].to_pylist()
        size = settings["part_size"]
        starts = raws[::size]
        partitions = [
            {
                "source": out.name,
                "db": settings["db"],
                "index": i,
                "start": s.hex(),
                "end": starts[i + 1].hex() if i + 1 < len(starts) else None,
                "count": len(raws[i * size : (i + 1) * size]),
            }
            for i, s in enumerate(starts)
        ]
        (out / "inputs.parquet").unlink()
        (out / "plan.json").write_text(json.dumps({"settings": settings, "partitions": partitions}))
    else:
        pq.write_table(index.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA), out / "inputs.parquet")
        legacy = {"settings": plan["settings"], "parts": plan["parts"], "photos": plan["inputs"]}
        (out / "plan.json").write_text(json.dumps(legacy))


def test_work_directory_of_the_previous_format_is_migrated(jpegs: list[bytes], tmp_path: Path) -> None:
    folder, db = tmp_path / "photos", tmp_path / "bed_train_lmdb"
    _add(folder, jpegs, range(6))
    write_lsun_lmdb(db, jpegs[:11])
    work = tmp_path / "w"
    run_photo_stage(folder, work, "x", INGEST, workers=1)
    extract_lsun(db, work, LSUN, workers=1)
    for name, kind in (("x", "photos"), ("bed_train", "lsun")):
        out = work / "extract" / name
        (out / f"part-00000{1 if kind == 'lsun' else 0}.parquet").unlink()  # a kill left one part unfinished
        _old_format(out, kind)
    old = {s: _parts(work / "extract" / s) for s in ("x", "bed_train")}

    _add(folder, jpegs, range(6, 8))
    photos = run_photo_stage(folder, work, "x", INGEST, workers=1)
    records = extract_lsun(db, work, LSUN, workers=1)
    for name in ("x", "bed_train"):
        now = _parts(work / "extract" / name)
        kept = {k: v for k, v in old[name].items() if not k.endswith(".tar") or k.replace(".tar", ".parquet") in old}
        assert {k: now[k] for k in kept} == kept  # finished parts are reused as they are
        assert json.loads((work / "extract" / name / "plan.json").read_text())["format"] == 2
    assert _photo_paths(photos, "ok") == {f"p{i:03d}.jpg" for i in range(8)}
    assert records.num_rows == 11 and set(records["status"].to_pylist()) == {"ok"}


def test_killed_incremental_run_resumes_to_the_uninterrupted_state(jpegs: list[bytes], tmp_path: Path) -> None:
    settings = IngestSettings(size=32, part_size=2)
    folder = tmp_path / "photos"
    _add(folder, jpegs, range(6))
    run_photo_stage(folder, tmp_path / "w", "x", settings, workers=1)
    _add(folder, jpegs, range(6, 20))
    shutil.copytree(tmp_path / "w", tmp_path / "clean")
    clean = run_photo_stage(folder, tmp_path / "clean", "x", settings, workers=1)

    script = (
        "import time; from pathlib import Path\n"
        "import preprocessing.photo_stages as S\n"
        "from preprocessing.settings import IngestSettings\n"
        "orig = S.run_photo_part\n"
        "def slow(*a, **k):\n"
        "    r = orig(*a, **k); time.sleep(0.4); return r\n"
        "S.run_photo_part = slow\n"
        f"S.run_photo_stage({str(folder)!r}, Path({str(tmp_path / 'w')!r}), 'x', "
        "IngestSettings(size=32, part_size=2), workers=1)\n"
    )
    out = tmp_path / "w" / "extract" / "x"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 120
    while len(list(out.glob("part-*.parquet"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(list(out.glob("part-*.parquet"))) < 10, "the kill must land mid-run"

    resumed = run_photo_stage(folder, tmp_path / "w", "x", settings, workers=2)
    assert resumed.equals(clean)
    assert _parts(out).keys() == _parts(tmp_path / "clean" / "extract" / "x").keys()
    digest = lambda d: {k: v[1] for k, v in _parts(d).items()}  # noqa: E731
    assert digest(out) == digest(tmp_path / "clean" / "extract" / "x")
    assert pq.read_table(out / "inputs.parquet").equals(pq.read_table(tmp_path / "clean/extract/x/inputs.parquet"))


def test_any_sequence_of_grow_shrink_and_rerun_accounts_for_every_input_once(
    jpegs: list[bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    present: set[int] = set()
    ever: set[int] = set()
    steps = [("add", range(0, 5)), ("add", range(5, 9)), ("del", [0, 6]), ("run", []), ("add", range(9, 12)),
             ("del", [3]), ("add", range(12, 13)), ("run", [])]  # fmt: skip
    for op, items in steps:
        if op == "add":
            _add(folder, jpegs, items)
            present |= set(items)
        elif op == "del":
            for i in items:
                (folder / f"p{i:03d}.jpg").unlink()
            present -= set(items)
        ever |= present
        manifest = run_photo_stage(folder, tmp_path / "w", "x", IngestSettings(size=32, part_size=3), workers=1)
        outcome = _accounting(manifest, "photo_key")
        paths = {r["photo_key"]: r["photo_path"] for r in manifest.to_pylist()}
        assert sorted(paths.values()) == sorted(f"p{i:03d}.jpg" for i in ever)
        assert {paths[k] for k, v in outcome.items() if v == "gone"} == {f"p{i:03d}.jpg" for i in ever - present}
