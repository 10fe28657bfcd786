"""Mapped stages on a Dask cluster (prefect-dask): same outputs as the process pool, worker loss, bad clusters."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.runners import RunnerError, check_runner
from preprocessing.lsun import write_lsun_lmdb
from preprocessing.settings import LsunSettings, RunnerSettings, SettingsError, parse_settings

cli = CliRunner()


def test_runner_settings_accept_the_three_places_and_refuse_the_rest() -> None:
    assert RunnerSettings.model_validate("process") == RunnerSettings()
    assert RunnerSettings(type="dask", workers=2).describe() == "temporary local Dask cluster of 2"
    assert RunnerSettings(type="dask", address="tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert RunnerSettings(type="dask", address="tls://[::1]:8786").address == "tls://[::1]:8786"
    bad = {
        "type: Input should be 'process' or 'dask'": {"type": "ray"},
        "exactly one of address": {"type": "dask"},
        "exactly one of address (an existing": {"type": "dask", "address": "tcp://h:1", "workers": 2},
        "takes neither": {"type": "process", "workers": 2},
        "must look like tcp://HOST:PORT": {"type": "dask", "address": "localhost:8786"},
        "must look like tcp://HOST:PORT, got 'tcp://bad'": {"type": "dask", "address": "tcp://bad"},
    }
    for message, values in bad.items():
        with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
            parse_settings(RunnerSettings, values, "runner")


def test_an_unreachable_scheduler_is_a_clear_error_before_any_work(tmp_path: Path, photo_values: list[bytes]) -> None:
    db = tmp_path / "db_lmdb"
    write_lsun_lmdb(db, photo_values[:4])
    t0 = time.perf_counter()
    result = cli.invoke(app, ["lsun", "--db", str(db), "--work", str(tmp_path / "w"), "--dask", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.output
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "w").exists()  # no work directory, no stage


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True) as c:
        yield c


def test_a_worker_that_cannot_see_a_path_is_named(cluster, tmp_path: Path) -> None:
    runner = RunnerSettings(type="dask", address=cluster.scheduler_address)
    check_runner(runner, [tmp_path], tmp_path / "not-made-yet" / "work")  # a new work dir: its parent is checked
    # Every worker of a local cluster shares this file system, so a worker's missing mount is played by a
    # path no machine has: the check runs on each worker and names the first that lacks it.
    with pytest.raises(RunnerError, match=r"Dask worker tcp://127\.0\.0\.1:\d+ cannot see /no/such/mount/db_lmdb"):
        check_runner(runner, ["/no/such/mount/db_lmdb"], tmp_path)


def _config(tmp_path: Path, db: Path, name: str, runner: dict | str) -> Path:
    cfg = {
        "work": str(tmp_path / name),
        "sources": [{"type": "lsun", "db": str(db)}],
        "extract": {"size": 32, "part_size": 500},
        "runner": runner,
        "dedup": {"max_epochs": 2},
        "shard": {"maxcount": 1000},
        "train": {"enabled": False},
        "evaluate": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_two_worker_local_cluster_gives_the_process_pool_s_outputs(prefect_api: None, tmp_path: Path) -> None:
    from preprocessing.demo_data import build_demo_lmdb

    db = build_demo_lmdb(tmp_path / "demo_train_lmdb", 3000)  # the demo's data: 3,000 records + 3 broken ones
    for name, runner in (("pool", "process"), ("dask", {"type": "dask", "workers": 2})):
        result = cli.invoke(app, ["run", "--config", str(_config(tmp_path, db, name, runner))])
        assert result.exit_code == 0, result.output
    pool, dask = tmp_path / "pool", tmp_path / "dask"
    files = sorted(p.relative_to(pool) for p in pool.rglob("*") if p.suffix in (".tar", ".parquet", ".npy"))
    tars = [f for f in files if f.suffix == ".tar"]
    assert len([f for f in tars if f.parts[0] == "extract"]) == 7 and any(f.parts[0] == "shards" for f in tars)
    for rel in tars + [f for f in files if f.suffix == ".npy"]:
        assert (pool / rel).read_bytes() == (dask / rel).read_bytes(), rel  # staging tars, crops, final shards
    for rel in [f for f in files if f.suffix == ".parquet"]:  # same rows (metadata holds file stamps)
        assert pq.read_table(pool / rel).equals(pq.read_table(dask / rel)), rel
    codes = pq.read_table(dask / "dedup" / "codes.parquet")
    assert codes.num_rows == 3000 and 0 < codes.num_rows - sum(codes["keep"].to_pylist()) < 3000


@pytest.mark.slow
def test_a_worker_killed_mid_map_still_ends_in_a_complete_extraction(
    prefect_api: None, cluster, tmp_path: Path, photo_values: list[bytes]
) -> None:
    from distributed import Client

    from flows.lsun import lsun_extract_flow

    db = tmp_path / "db_lmdb"
    write_lsun_lmdb(db, photo_values * 4)  # 240 records in 24 parts
    out = tmp_path / "w" / "extract" / "db"
    with Client(cluster.scheduler_address, set_as_default=False) as client:
        pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]

    def kill_after_first_part() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("part-*.tar")):
            time.sleep(0.02)
        os.kill(victim, 9)

    killer = threading.Thread(target=kill_after_first_part)
    killer.start()
    runner = RunnerSettings(type="dask", address=cluster.scheduler_address)
    [summary] = lsun_extract_flow([str(db)], str(tmp_path / "w"), LsunSettings(size=32, part_size=10), runner=runner)
    killer.join()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the worker really died during the map
    manifest = pq.read_table(out / "manifest.parquet")
    assert summary["total"] == manifest.num_rows == 240 and summary["ok"] == 240
    assert len(set(manifest["key"].to_pylist())) == 240 and len(list(out.glob("part-*.tar"))) == 24
