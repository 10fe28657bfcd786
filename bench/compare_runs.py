"""Side by side: two training runs' logged losses and D outputs at the steps both logged.

Used to check that the fast step tracks the textbook step on the same seed and data
(GAN training is chaotic, so long runs drift apart; early steps should agree closely).

    python bench/compare_runs.py RUN_TEXTBOOK RUN_FAST
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")


def rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def main() -> None:
    a, b = rows(Path(sys.argv[1])), rows(Path(sys.argv[2]))
    print(f"{'step':>6} " + " ".join(f"{k + ' a/b':>17}" for k in KEYS) + f" {'img/s a/b':>17}")
    for step in sorted(set(a) & set(b)):
        cells = " ".join(f"{a[step][k]:8.3f}/{b[step][k]:<8.3f}" for k in KEYS)
        print(f"{step:>6} {cells} {a[step]['img_per_s']:8.0f}/{b[step]['img_per_s']:<8.0f}")


if __name__ == "__main__":
    main()
