"""Figures and tables of a finished recipe run for docs/results.md.

Reads a work directory after `dcgan-pipeline run --config configs/<recipe>.yaml` (and any extra
`dcgan-pipeline evaluate --checkpoint ...` of earlier checkpoints, found under eval/<run>*),
draws the SWD-per-checkpoint curve, copies the evaluation figures (downscaled to keep the
committed PNGs small) and prints the markdown rows the results page quotes.

    python bench/recipe_figures.py --work work/cifar10 --out docs/results/cifar10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

FIGURES = ("samples", "latent_walks", "memorisation", "guided_backprop", "vector_arithmetic", "feature_removal")


def curve(points: list[tuple[int, float]], title: str, size: tuple[int, int] = (560, 300)) -> np.ndarray:
    """A line plot of (step, value) on white, with labelled axes: no plotting library needed."""
    w, h = size
    left, right, top, bottom = 70, 20, 34, 44
    img = np.full((h, w, 3), 255, np.uint8)
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    x0, x1 = 0.0, xs.max()
    y0, y1 = 0.0, ys.max() * 1.1

    def at(x: float, y: float) -> tuple[int, int]:
        px = left + (x - x0) / (x1 - x0 or 1) * (w - left - right)
        py = h - bottom - (y - y0) / (y1 - y0 or 1) * (h - top - bottom)
        return int(round(px)), int(round(py))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, at(x0, y0), at(x1, y1), (180, 180, 180), 1)
    for frac in np.linspace(0, 1, 5):
        y = y0 + frac * (y1 - y0)
        cv2.putText(img, f"{y:.0f}", (8, at(x0, y)[1] + 4), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
        x = x0 + frac * (x1 - x0)
        cv2.putText(img, f"{x:.0f}", (at(x, y0)[0] - 14, h - bottom + 16), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    line = np.array([at(x, y) for x, y in zip(xs, ys, strict=True)], np.int32)
    cv2.polylines(img, [line], False, (200, 80, 20), 2, cv2.LINE_AA)
    for p in line:
        cv2.circle(img, tuple(int(v) for v in p), 3, (200, 80, 20), -1, cv2.LINE_AA)
    cv2.putText(img, title, (left, 22), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "training step", (w // 2 - 40, h - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def shrink(path: Path, out: Path, max_side: int) -> None:
    """A copy at most `max_side` px long, as a 256-colour PNG (a third of the bytes, same look)."""
    img = Image.open(path).convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    img.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-side", type=int, default=640, help="longest side of a copied figure, px")
    parser.add_argument("--sheet", action="store_true", help="also copy the numbered sample sheet")
    args = parser.parse_args()
    (run,) = sorted((args.work / "train").iterdir())[-1:]
    args.out.mkdir(parents=True, exist_ok=True)
    quality = [json.loads(line) for line in (run / "quality.jsonl").read_text().splitlines() if line.strip()]
    points = [(q["step"], q["swd"]) for q in quality]
    cv2.imwrite(str(args.out / "swd.png"), curve(points, f"SWD to the training images ({quality[0]['images']} each)"))
    print("| step | " + " | ".join(str(s) for s, _ in points) + " |")
    print("|---|" + "---|" * len(points))
    print("| SWD | " + " | ".join(f"{v:.1f}" for _, v in points) + " |")
    metrics_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = metrics_rows[-1]["time"] - metrics_rows[0]["time"]
    rate = np.median([r["img_per_s"] for r in metrics_rows])
    print(f"\ntraining: {metrics_rows[-1]['step']} steps, median {rate:.0f} img/s, {seconds / 60:.1f} min logged")
    for eval_dir in sorted((args.work / "eval").glob(f"{run.name}*")):
        m = json.loads((eval_dir / "metrics.json").read_text())
        memo = m["samples"]["memorisation"]
        line = f"\n{eval_dir.name}: step {m['step']}, SWD {m['samples']['swd']['mean']:.1f}, memorisation {memo}"
        print(line)
        for name, r in m.get("cifar10", {}).items():
            print(f"  CIFAR-10 {name}: {100 * r['test_accuracy']:.2f}% (C={r['C']:g}, {r['feature_dim']}-d)")
        for name in FIGURES + (("sample_sheet",) if args.sheet else ()):
            src = eval_dir / "figures" / f"{name}.png"
            if src.exists() and eval_dir.name == run.name:
                shrink(src, args.out / f"{name}.png", args.max_side)
    total = sum(p.stat().st_size for p in args.out.glob("*.png"))
    print(f"\n{args.out}: {total / 1e6:.2f} MB of PNG")


if __name__ == "__main__":
    main()
