"""The real server path: scripts/prefect_server.sh up, a deployment run of pipeline/full, down.

One slow test, about two minutes on 2 CPU cores: a Prefect server on a free port with its database
in a temporary PREFECT_HOME, the deployments of prefect.yaml, one process worker per pool, and the
configs/tiny.yaml pipeline (work directory moved to tmp_path) run by the cpu worker, started and
watched by the command of docs/prefect.md typed with no PREFECT_API_URL in its environment: Prefect
reads it from the .env line `up` writes and `down` removes. That .env is one of the test's own, the
commands run beside it: the repository root's .env would point every Prefect process started at the
root meanwhile (a shell, another test run and the temporary servers it starts) at this short-lived
server. DCGAN_TEST_REPO_DOTENV=1 uses the repository root's .env (left as it was found) instead.
Fast tests: the size of report artifacts, and `down` removing only its own .env line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from flows.reports import ARTIFACT_MAX_BYTES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prefect_server.sh"
API_URL_LINE = re.compile(r"^\s*(?:export\s+)?PREFECT_API_URL\s*=", re.MULTILINE)
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
    "verify/verify",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with_env(*assignments: bytes) -> list[tuple[int, str]]:
    """Live processes whose environment holds every one of `assignments` (e.g. b"PREFECT_API_URL=...")."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            if not environ.issuperset(assignments):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie waiting for its parent: not running
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append((int(proc.name), cmd))
    return found


def _script_env(home: Path, port: int) -> dict[str, str]:
    """The environment of a new shell: no PREFECT_* variable but the test's PREFECT_HOME."""
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
    env.pop("DOTENV", None)
    return env


def _run(
    args: list[str], env: dict[str, str], timeout: float, show: bool = True, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run from `cwd` (the project root); echo the command, its time and (with `show`) its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(args)}  -> rc {proc.returncode} in {time.perf_counter() - t0:.0f} s")
    print(proc.stdout[-4000:] if show else "", proc.stderr[-4000:])
    return proc


@pytest.mark.slow
def test_server_deploy_run_down(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect_home"
    env = _script_env(home, port)
    cli_env = {**env, "PREFECT_API_URL": api}
    # The folder a new shell runs `prefect` in, and its .env that `up` writes PREFECT_API_URL into (see the
    # module doc). The repository root's .env may hold a PREFECT_API_URL line already (yours, or your own
    # server's while it runs): `up` leaves it, and the commands below name the server instead.
    shell = ROOT if os.environ.get("DCGAN_TEST_REPO_DOTENV") == "1" else tmp_path / "shell"
    shell.mkdir(exist_ok=True)
    dotenv = shell / ".env"
    if shell != ROOT:
        env["DOTENV"] = str(dotenv)
    dotenv_before = dotenv.read_text() if dotenv.is_file() else None
    ours = dotenv_before is None or not API_URL_LINE.search(dotenv_before)
    typed_env = env if ours else cli_env  # what a new shell has there, when .env is ours

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
        if ours:  # a prefect command beside the .env, no PREFECT_API_URL in its environment: this server
            assert f"PREFECT_API_URL={api}  # scripts/prefect_server.sh up (PREFECT_HOME={home})" in dotenv.read_text()
            view = _run(["prefect", "config", "view"], env, timeout=60, cwd=shell)
            assert f"PREFECT_API_URL='{api}' (from .env file)" in view.stdout, view.stdout
        else:
            assert dotenv.read_text() == dotenv_before, "up changed a .env line that was not its own"

        ls = _run(["prefect", "deployment", "ls"], typed_env, timeout=60, cwd=shell)
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
            "verify": "cpu",
        }
        for n in ("train", "retrain"):  # a deployment concurrency limit lives in a global limit
            assert by_name[n]["global_concurrency_limit"]["limit"] == 1
        assert [s["schedule"]["cron"] for s in by_name["retrain"]["schedules"]] == ["0 3 * * 0"]

        # As docs/prefect.md says to type it (scripts/prefect_server.sh run is the same with PREFECT_API_URL set).
        watch = ["prefect", "deployment", "run", "pipeline/full", "--param", f"config={config_path}", "--watch"]
        run = _run(watch, typed_env, timeout=400, cwd=shell)
        worker_log = home / "run" / "worker-cpu.log"
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + worker_log.read_text()[-6000:]
        # --watch showed each stage's own logs (copied to the pipeline's run by flows.progress), not just states
        for stage in ("lsun-extract", "dedup", "shard", "train", "evaluate"):
            assert re.search(rf"^▪ .* {stage}: ", run.stdout, re.MULTILINE), (stage, run.stdout[-4000:])
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
        # No event over Prefect's size limit (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES, 1.5 MB): an artifact's events
        # carry its data, so every report artifact holds thumbnails and file names, not full-size figures.
        server_log = (home / "run" / "server.log").read_text()
        assert "Refusing to publish event" not in server_log, server_log[-3000:]
        query = urllib.request.Request(
            f"{api}/artifacts/filter", b'{"limit": 200}', {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(query, timeout=60) as response:
            artifacts = json.load(response)
        sizes = {a["key"]: len(json.dumps(a["data"])) for a in artifacts}
        assert {"dedup", "shards"} <= set(sizes) and any(k.startswith("eval-") for k in sizes), sizes
        over = {k: n for k, n in sizes.items() if n > ARTIFACT_MAX_BYTES + 1000}  # + the JSON escapes of the text
        assert not over, f"artifacts over {ARTIFACT_MAX_BYTES} bytes: {over} (all: {sizes})"
    finally:
        down = _run([str(SCRIPT), "down"], env, timeout=180)
        dotenv_after = dotenv.read_text() if dotenv.is_file() else None
        if ours and dotenv_after != dotenv_before:  # never leave the checkout's .env changed, even when failing
            if dotenv_before is None:
                dotenv.unlink()
            else:
                dotenv.write_text(dotenv_before)
        # The test's processes: this server's URL and this PREFECT_HOME (a process of someone else that read the
        # URL from the root's .env, with DCGAN_TEST_REPO_DOTENV=1, is not one of them).
        ours_env = (f"PREFECT_API_URL={api}".encode(), f"PREFECT_HOME={home}".encode())
        deadline = time.monotonic() + 10
        while (left := _processes_with_env(*ours_env)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, _ in left:  # never leave them behind, even when the assertions below fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert down.returncode == 0, down.stderr
    assert dotenv_after == dotenv_before, "down did not leave .env as it found it"
    assert not left, f"left running after down: {left}"
    assert not list((home / "run").glob("*.pid"))
    status = _run([str(SCRIPT), "status"], env, timeout=60)
    assert status.returncode != 0 and "server: not running" in status.stdout


def test_report_artifacts_carry_thumbnails_under_the_event_limit(tmp_path: Path) -> None:
    """The server sends an artifact's data in its events and drops events over its size limit."""
    from prefect.settings.models.server.events import ServerEventsSettings

    from flows.reports import artifact_markdown

    limit = ServerEventsSettings.model_fields["maximum_size_bytes"].default  # 1.5 MB in prefect 3.9
    assert limit // 2 > ARTIFACT_MAX_BYTES
    rng = np.random.default_rng(0)
    (tmp_path / "figures").mkdir()
    names = ["noise_a", "noise_b", "noise_c", "noise_d", "noise_e", "noise_f", "small"]
    for name in names:  # noise: PNG cannot compress it (1.9 MB each); a small one fits as it is
        side = 64 if name == "small" else 800
        cv2.imwrite(str(tmp_path / "figures" / f"{name}.png"), rng.integers(0, 256, (side, side, 3), np.uint8))
    markdown = "# Report\n\n" + "".join(f"## {n}\n\n![{n}](figures/{n}.png)\n\n" for n in names)
    assert sum((tmp_path / "figures" / f"{n}.png").stat().st_size for n in names) > 5 * limit

    text = artifact_markdown(markdown, tmp_path)
    assert len(text.encode()) <= ARTIFACT_MAX_BYTES
    assert text.count("](data:image/") == len(names)  # every figure as a thumbnail, small enough to fit
    small = (tmp_path / "figures" / "small.png").read_bytes()
    assert f"![small](data:image/png;base64,{base64.b64encode(small).decode()})" in text  # small: the PNG itself
    for n in names:  # and where the full-size file is
        assert f"{n}, full size: `{tmp_path / 'figures' / n}.png`" in text
    thumbs = re.findall(r"data:image/(?:png|jpeg);base64,([^)]*)", text)
    for uri in thumbs:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(uri), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and max(image.shape[:2]) <= 512

    tight = artifact_markdown(markdown, tmp_path, max_bytes=60_000)  # too little room: figures named only
    assert len(tight.encode()) <= 60_000 and all(f"{n}, full size: " in tight for n in names)
    long = artifact_markdown("x" * (2 * ARTIFACT_MAX_BYTES), tmp_path)
    assert len(long.encode()) <= ARTIFACT_MAX_BYTES and "cut at" in long


def test_down_removes_only_its_own_dotenv_line(tmp_path: Path) -> None:
    """`down` (nothing running) takes out the PREFECT_API_URL line `up` wrote for its PREFECT_HOME, and only it."""
    home = (tmp_path / "home").resolve()
    dotenv = tmp_path / ".env"
    mark = "# scripts/prefect_server.sh up (PREFECT_HOME={}); `down` removes this line\n"
    other = f"PREFECT_API_URL=http://127.0.0.1:1/api  {mark.format('/another/home')}"
    dotenv.write_text(f"FOO=1\n{other}PREFECT_API_URL=http://127.0.0.1:2/api  {mark.format(home)}BAR=2")
    env = {**_script_env(home, _free_port()), "DOTENV": str(dotenv)}
    status = _run([str(SCRIPT), "status"], env, timeout=60)
    assert status.returncode != 0 and "PREFECT_API_URL=http://127.0.0.1:2/api (written by up:" in status.stdout
    down = _run([str(SCRIPT), "down"], env, timeout=60)
    assert down.returncode == 0, down.stderr
    assert dotenv.read_text() == f"FOO=1\n{other}BAR=2"
