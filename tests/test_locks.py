"""One writer at a time: stage locks name their holder, wait or refuse, survive crashes, and guard shard rewrites."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from preprocessing.locks import (
    LockedError,
    LockSettings,
    hold,
    is_held,
    lock_path,
    reading_shards,
    rewriting_shards,
)
from preprocessing.settings import ShardSettings

NO_WAIT = LockSettings(wait=False)


def test_a_held_lock_names_its_holder_and_refuses_without_waiting(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "shards")
    with hold(path, "sharding", command="dcgan-pipeline shard --work w"):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "dcgan-pipeline shard --work w"
        assert is_held(path)
        busy = rf"sharding is busy: pid {os.getpid()} on .* since .*shard --work w"
        with pytest.raises(LockedError, match=busy), hold(path, "sharding", NO_WAIT):
            pass
        with (
            pytest.raises(LockedError, match="still busy after 0.3 s"),
            hold(path, "sharding", LockSettings(wait_timeout=0.3)),
        ):
            pass
    assert path.read_text() == "" and not is_held(path)  # released: emptied, never deleted


def test_a_waiting_writer_runs_after_the_holder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = lock_path(tmp_path, "dedup")
    order: list[str] = []
    taken = threading.Event()

    def first() -> None:
        with hold(path, "dedup", command="first"):
            taken.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    taken.wait()
    with caplog.at_level(logging.INFO, logger="preprocessing.locks"), hold(path, "dedup", command="second"):
        order.append("second runs")
    thread.join()
    assert order == ["first done", "second runs"]
    assert "dedup is busy: waiting for" in caplog.text and "(first)" in caplog.text


def test_a_dead_holders_lock_is_taken_over_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = lock_path(tmp_path, "extract-demo")
    script = (
        "import os, sys; from pathlib import Path; from preprocessing.locks import hold\n"
        "with hold(Path(sys.argv[1]), 'extraction of demo', command='killed ingest'):\n"
        "    print('held', flush=True); os.kill(os.getpid(), 9)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == -9 and "held" in proc.stdout
    assert json.loads(path.read_text())["command"] == "killed ingest"  # the name stays behind
    with caplog.at_level(logging.WARNING, logger="preprocessing.locks"), hold(path, "extraction of demo", NO_WAIT):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "killed ingest" in caplog.text and "died" in caplog.text


def test_a_lock_file_holding_garbage_is_taken_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = lock_path(tmp_path, "retrain")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00\xffnot json")
    with caplog.at_level(logging.WARNING, logger="preprocessing.locks"), hold(path, "retrain", NO_WAIT):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "held no holder's name (damaged)" in caplog.text


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "extract-x")
    ready, started = os.pipe()
    with hold(path, "extraction of x"):
        pid = os.fork()
        if pid == 0:  # a pool worker that outlives its parent's block (fork hooks have run by now)
            os.write(started, b"1")
            time.sleep(1.0)
            os._exit(0)
    os.read(ready, 1)
    try:
        assert not is_held(path)  # released although the child still runs
    finally:
        os.waitpid(pid, 0)


def test_a_shard_rewrite_waits_for_or_refuses_a_reading_training(tmp_path: Path) -> None:
    training = hold(
        lock_path(tmp_path, "train-run-a"), "training run run-a", command="dcgan-pipeline train --run run-a"
    )
    with training, reading_shards(tmp_path), reading_shards(tmp_path):  # readers share
        busy = r"rebuild of .*shards is busy: .*train --run run-a\) reading"
        with pytest.raises(LockedError, match=busy), rewriting_shards(tmp_path, NO_WAIT):
            pass
    with rewriting_shards(tmp_path, NO_WAIT):  # no reader left
        pass


def _cli(*args: str, log: Path | None = None) -> subprocess.Popen:
    """`dcgan-pipeline ARGS` in a process of its own, on the test API (PREFECT_API_URL of the harness).

    With `log`, its output goes to that file (to be read while it runs), else to a pipe.
    """
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", *args]
    root = Path(__file__).resolve().parents[1]
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child holds it; closed on exit
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the running command has logged `text`."""
    end = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < end, f"no {text!r} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_two_ingests_of_a_grown_folder_at_once_extract_the_new_part_once(prefect_api: None, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from tests.conftest import celeba_jpegs

    folder, work = tmp_path / "photos", tmp_path / "w"
    folder.mkdir()
    jpegs = celeba_jpegs(12, offset=500)
    for i in range(8):
        (folder / f"p{i:03d}.jpg").write_bytes(jpegs[i])
    args = ("ingest", "--images", str(folder), "--work", str(work), "--name", "x", "--part-size", "4")
    _finish(_cli(*args))
    for i in range(8, 12):
        (folder / f"p{i:03d}.jpg").write_bytes(jpegs[i])
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with hold(lock_path(work, "extract-x"), "extraction of x", command="the test"):  # both start while it is busy
        procs = [_cli(*args, log=log) for log in logs]
        for proc, log in zip(procs, logs, strict=True):
            _wait_for(log, "extraction of x is busy: waiting for", proc)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=300) == 0, log.read_text()
    said = sorted("12 photos (4 new)" in log.read_text() for log in logs)
    assert said == [False, True] and sum("12 photos (0 new)" in log.read_text() for log in logs) == 1
    out = work / "extract" / "x"
    assert sorted(p.name for p in out.glob("part-*.tar")) == [f"part-00000{i}.tar" for i in range(3)]
    manifest = pq.read_table(out / "manifest.parquet")
    assert sorted(manifest["photo_path"].to_pylist()) == [f"p{i:03d}.jpg" for i in range(12)]  # each once


def _codes(work: Path, dropped: int) -> set[str]:
    """A dedup result over every ok item of the work directory, the first `dropped` not kept; the kept keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, sources = [], []
    for manifest in sorted(work.glob("extract/*/manifest.parquet")):
        ok = [r["key"] for r in pq.read_table(manifest).to_pylist() if r["status"] == "ok"]
        keys += ok
        sources += [manifest.parent.name] * len(ok)
    keep = [i >= dropped for i in range(len(keys))]
    (work / "dedup").mkdir(exist_ok=True)
    pq.write_table(pa.table({"key": keys, "source": sources, "keep": keep}), work / "dedup" / "codes.parquet")
    return {f"{s}/{k}" for s, k, kept in zip(sources, keys, keep, strict=True) if kept}


@pytest.mark.slow
def test_a_cli_shard_run_waits_for_a_deployment_run_and_then_sees_the_new_dedup(
    prefect_api: None, shards_dir: Path, tmp_path: Path
) -> None:
    """Two shard runs at once with different dedup results: the second runs after the first, on the new result."""
    from preprocessing.sharding import build_shards
    from preprocessing.tar_shards import iter_samples

    work = tmp_path / "w"
    shutil.copytree(shards_dir.parent, work, ignore=shutil.ignore_patterns("shards", "locks"))
    _codes(work, dropped=0)
    holder = "deployment shard/shard, flow run brisk-heron"
    with hold(lock_path(work, "shards"), "sharding", command=holder):
        refused = _cli("shard", "--work", str(work), "--no-wait")
        out, _ = refused.communicate(timeout=300)
        assert refused.returncode == 2 and "error: sharding is busy" in out and "brisk-heron" in out, out
        log = tmp_path / "waiting.log"
        waiting = _cli("shard", "--work", str(work), "--maxcount", "25", log=log)
        assert build_shards(work, ShardSettings(maxcount=25))["version"] == 1  # the deployment run's own write
        kept = _codes(work, dropped=5)  # dedup changed while the second run waits
        _wait_for(log, "sharding is busy: waiting for", waiting)
        assert "brisk-heron" in log.read_text() and waiting.poll() is None
    assert waiting.wait(timeout=300) == 0, log.read_text()
    index = json.loads((work / "shards" / "index.json").read_text())
    versions = json.loads((work / "shards" / "versions.json").read_text())
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["rebuild"]
    in_tars = [k for e in index["shardlist"] for k, _ in iter_samples(work / "shards" / e["url"])]
    assert sorted(in_tars) == sorted(kept) and index["total"] == len(kept)
