"""The real server path: scripts/prefect_server.sh up, a deployment run of pipeline/full, down.

One test, about two minutes on 2 CPU cores: a Prefect server on a free port with its database in
a temporary PREFECT_HOME, the deployments of prefect.yaml, one process worker per pool, and the
configs/tiny.yaml pipeline (work directory moved to tmp_path) run by the cpu worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prefect_server.sh"
DEPLOYMENTS = {
    "pipeline/full",
    "lsun-extract/lsun-extract",
    "faces/faces",
    "ingest/ingest",
    "dedup/dedup",
    "shard/shard",
    "train/train",
    "retrain/retrain",
    "evaluate/evaluate",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with_env(assignment: bytes) -> list[tuple[int, str]]:
    """Live processes whose environment holds `assignment` (e.g. b"PREFECT_API_URL=...")."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if assignment not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie waiting for its parent: not running
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(proc.name), cmd))
    return found


def _run(args: list[str], env: dict[str, str], timeout: float, show: bool = True) -> subprocess.CompletedProcess:
    """Run from the project root; echo the command, its time and (with `show`) its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(args)}  -> rc {proc.returncode} in {time.perf_counter() - t0:.0f} s")
    print(proc.stdout[-4000:] if show else "", proc.stderr[-4000:])
    return proc


@pytest.mark.slow
def test_server_deploy_run_down(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PORT=str(port),
        PREFECT_WORKER_QUERY_SECONDS="2",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",  # rich tables of the CLI: no truncated names
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `prefect` of this Python
    )
    cli_env = {**env, "PREFECT_API_URL": api}

    work = tmp_path / "work"
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["work"] = str(work)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))

    try:
        up = _run([str(SCRIPT), "up"], env, timeout=300)
        assert up.returncode == 0, up.stderr
        for name in ("server", "worker-cpu", "worker-gpu"):
            assert (home / "run" / f"{name}.pid").is_file()

        ls = _run(["prefect", "deployment", "ls"], cli_env, timeout=60)
        assert ls.returncode == 0, ls.stderr
        assert set(re.findall(r"[\w-]+/[\w-]+", ls.stdout)) >= DEPLOYMENTS, ls.stdout

        details = _run(["prefect", "deployment", "ls", "--output", "json"], cli_env, timeout=60, show=False)
        by_name = {d["name"]: d for d in json.loads(details.stdout)}
        assert {n.split("/")[1] for n in DEPLOYMENTS} <= set(by_name)
        for d in by_name.values():  # `{{ $PWD }}` was resolved at deploy time to the project root
            assert d["entrypoint"].startswith("flows.") and ":" not in d["entrypoint"]
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert by_name["full"]["parameters"] == {"config": "configs/demo.yaml"}
        assert {n: by_name[n]["work_pool_name"] for n in by_name} == {
            "full": "cpu",
            "lsun-extract": "cpu",
            "faces": "cpu",
            "ingest": "cpu",
            "dedup": "cpu",
            "shard": "cpu",
            "train": "gpu",
            "retrain": "gpu",
            "evaluate": "cpu",
        }
        for n in ("train", "retrain"):  # a deployment concurrency limit lives in a global limit
            assert by_name[n]["global_concurrency_limit"]["limit"] == 1
        assert [s["schedule"]["cron"] for s in by_name["retrain"]["schedules"]] == ["0 3 * * 0"]

        run = _run([str(SCRIPT), "run", "--param", f"config={config_path}"], env, timeout=400)
        worker_log = home / "run" / "worker-cpu.log"
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + worker_log.read_text()[-6000:]
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
        inspect = ["prefect", "flow-run", "inspect", flow_run_id, "--output", "json"]
        flow_run = json.loads(_run(inspect, cli_env, timeout=60, show=False).stdout)
        assert flow_run["state"]["type"] == "COMPLETED"

        index = json.loads((work / "shards" / "index.json").read_text())
        assert index["total"] > 0
        assert list(work.glob("train/*/checkpoints/*.pt"))
        assert (work / "report.md").read_text().strip()

        # The pipeline's shard stage wrote version 1 and emitted dcgan.dataset.updated: the retrain deployment's
        # trigger starts a retrain of this work directory by itself; the pipeline's run, the champion, saw it.
        retrain, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline:
            ls = ["prefect", "flow-run", "ls", "--flow-name", "retrain", "--output", "json"]
            runs = json.loads(_run(ls, cli_env, timeout=60, show=False).stdout or "[]")
            retrain = next((r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")), None)
            if retrain:
                break
            time.sleep(3)
        gpu_log = home / "run" / "worker-gpu.log"
        assert retrain and retrain["state"]["type"] == "COMPLETED", gpu_log.read_text()[-6000:]
        assert retrain["parameters"]["work"] == str(work.resolve())
        registry = json.loads((work / "models" / "registry.json").read_text())
        trained = next(iter(registry["runs"]))  # the pipeline's run, the first champion
        assert registry["champion"] == trained and len(registry["runs"]) == 1  # it saw version 1: nothing to do
        assert "Nothing to do" in (work / "reports" / "retrain.md").read_text()

        # One stage rerun with a settings override as JSON, validated by the server against the model's schema.
        rerun = ["prefect", "deployment", "run", "shard/shard", "--param", f"work={work}", "--watch"]
        bad = _run([*rerun, "--param", 'settings={"maxcount": 0}'], cli_env, timeout=120)
        assert bad.returncode != 0 and "maxcount" in bad.stdout + bad.stderr
        good = _run([*rerun, "--param", 'settings={"maxcount": 40}'], cli_env, timeout=300)
        assert good.returncode == 0, good.stdout[-2000:] + worker_log.read_text()[-4000:]
        index = json.loads((work / "shards" / "index.json").read_text())
        assert len(index["shardlist"]) > 1 and max(s["nsamples"] for s in index["shardlist"]) == 40
    finally:
        down = _run([str(SCRIPT), "down"], env, timeout=180)
        deadline = time.monotonic() + 10
        while (left := _processes_with_env(f"PREFECT_API_URL={api}".encode())) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, _ in left:  # never leave them behind, even when the assertions below fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert down.returncode == 0, down.stderr
    assert not left, f"left running after down: {left}"
    assert not list((home / "run").glob("*.pid"))
    status = _run([str(SCRIPT), "status"], env, timeout=60)
    assert status.returncode != 0 and "server: not running" in status.stdout
