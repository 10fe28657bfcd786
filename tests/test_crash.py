"""Crash anywhere, in short: bench/crash.py kills the pipeline with SIGKILL at random moments and compares the rerun.

The full run (200 trials, docs/benchmarks.md) takes an hour; this one draws a few kill points
over a small first batch and a growing second batch, and must find no difference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_runs_rerun_to_the_uninterrupted_state(tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    cmd = [sys.executable, str(ROOT / "bench" / "crash.py"), "--trials", "4", "--records", "240", "--steps", "4"]
    cmd += ["--root", str(tmp_path / "crash"), "--seed", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["trials"] == 4 and result["differences"] == []
    assert sum(result["kills"].values()) == 4 and any(k.startswith("grow/") for k in result["kills"])
