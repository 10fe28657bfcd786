"""Forgetting to draw an object (paper section 6.3.1, figure 6): drop G's feature maps for boxed regions.

The user draws boxes around an object (the paper: windows) on samples of the numbered sample
sheet. Every spatial position of G's second-highest layer (the ReLU output feeding the last
transposed convolution, at half the image resolution) is labelled positive when its cell
centre lies inside a box of that sample, negative otherwise (the paper: random positions of
the same image). A logistic regression on the activation vectors at those positions (features
standardised, classes weighted equally, small L2 penalty, fitted with L-BFGS in torch) finds
the feature maps whose activation predicts "inside"; those with positive weight are zeroed at
every position, and the same z's are generated again.

Boxes file (JSON), in pixel coordinates of a sample (0..resolution, x to the right, y down):

    {"samples": [{"index": 3, "boxes": [[x0, y0, x1, y1], ...]}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcgan.evaluation.cifar import EvaluationError
from dcgan.evaluation.figures import captioned_grid
from dcgan.evaluation.quality import generate

Boxes = dict[int, list[tuple[float, float, float, float]]]


def load_boxes(path: Path, resolution: int, sheet_size: int) -> Boxes:
    """Sample index -> boxes, checked against the sheet and the image size; every problem is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"boxes file not found: {path}")
    text = path.read_text()
    if not text.strip():
        raise EvaluationError(f'boxes file {path} is empty; expected {{"samples": [{{"index": i, "boxes": ...}}]}}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"boxes file {path} is not valid JSON: {exc}") from exc
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, list) or not samples:
        raise EvaluationError(f'boxes file {path} needs a non-empty list under "samples"')
    out: Boxes = {}
    for entry in samples:
        index = entry.get("index") if isinstance(entry, dict) else None
        boxes = entry.get("boxes") if isinstance(entry, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(boxes, list) or not boxes:
            raise EvaluationError(f'{path}: each sample needs an integer "index" and a non-empty "boxes" list')
        if not 0 <= index < sheet_size:
            raise EvaluationError(f"{path}: sample index {index} is out of range (the sheet has 0..{sheet_size - 1})")
        if index in out:
            raise EvaluationError(f"{path}: sample {index} is listed twice")
        checked = []
        for box in boxes:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
                raise EvaluationError(f"{path}: sample {index}: a box must be [x0, y0, x1, y1], got {box!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
                raise EvaluationError(
                    f"{path}: sample {index}: box {box} is outside the {resolution}x{resolution} image "
                    "or empty (need 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size)"
                )
            checked.append((x0, y0, x1, y1))
        out[index] = checked
    return out


def box_mask(boxes: list[tuple[float, float, float, float]], resolution: int, size: int) -> np.ndarray:
    """(size, size) bool: cells of a size x size layer whose centre lies inside any box."""
    centres = (np.arange(size) + 0.5) * resolution / size
    mask = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        mask |= ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    return mask


def penultimate_layer(G: nn.Module) -> nn.Module:
    """The module whose output feeds G's last transposed convolution."""
    layers = list(G.main)
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d))
    return layers[last - 1]


@torch.no_grad()
def layer_activations(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) activations of G's second-highest layer."""
    captured: list[torch.Tensor] = []
    hook = penultimate_layer(G).register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
    try:
        G.eval()(z)
    finally:
        hook.remove()
    return captured[0]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Weights in the original feature directions (sign as fitted) and balanced training accuracy."""
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / scale
    pos = y.float().mean()
    weight = torch.where(y, 0.5 / pos, 0.5 / (1 - pos))  # each class counts half
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight * nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y.float(), reduction="none")).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xs @ w + b) > 0
        balanced = 0.5 * ((pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum())
    return (w / scale).detach(), float(balanced)


@torch.no_grad()
def generate_without(G: nn.Module, z: torch.Tensor, drop: torch.Tensor) -> np.ndarray:
    """Samples with the feature maps flagged in `drop` (bool, C) zeroed at every position."""
    keep = (~drop).float()[None, :, None, None]
    hook = penultimate_layer(G).register_forward_hook(lambda _m, _i, out: out * keep)
    try:
        return generate(G, z)
    finally:
        hook.remove()


def feature_map_removal(G: nn.Module, z_sheet: torch.Tensor, boxes: Boxes, resolution: int) -> tuple[dict, dict]:
    """Fit the inside-box classifier, drop the positive-weight maps, regenerate the sheet.

    Returns the images {"before", "after"} of the whole sheet and a summary (maps dropped,
    positions used, classifier accuracy, and the mean absolute pixel change inside versus
    outside the boxes of the annotated samples: removal should change the boxed regions most).
    """
    indices = sorted(boxes)
    acts = layer_activations(G, z_sheet[indices])
    n, c, size, _ = acts.shape
    masks = torch.from_numpy(np.stack([box_mask(boxes[i], resolution, size) for i in indices]))
    if masks.all() or not masks.any():
        raise EvaluationError(
            f"the boxes cover {'every' if masks.all() else 'no'} position of G's {size}x{size} layer; "
            "need positions both inside and outside them"
        )
    weights, accuracy = fit_logistic(acts.permute(0, 2, 3, 1).reshape(-1, c), masks.reshape(-1))
    drop = weights > 0
    before = generate(G, z_sheet)
    after = generate_without(G, z_sheet, drop)
    change = np.abs(after[indices].astype(np.float32) - before[indices].astype(np.float32)).mean(-1)
    pixel_masks = np.stack([box_mask(boxes[i], resolution, resolution) for i in indices])
    summary = {
        "annotated_samples": indices,
        "boxes": sum(len(b) for b in boxes.values()),
        "layer": f"{c} feature maps at {size}x{size}",
        "maps_dropped": int(drop.sum()),
        "maps_total": c,
        "dropped": torch.nonzero(drop).flatten().tolist(),
        "positions_inside": int(masks.sum()),
        "positions_outside": int((~masks).sum()),
        "balanced_accuracy": accuracy,
        "pixel_change_inside": float(change[pixel_masks].mean()),
        "pixel_change_outside": float(change[~pixel_masks].mean()),
    }
    return {"before": before, "after": after}, summary


def before_after_grid(images: dict, annotated: list[int], n: int = 20, columns: int = 10) -> np.ndarray:
    """Rows of `columns` samples before removal, each followed by the same samples after it.

    The annotated samples come first, then the rest of the sheet in order, `n` in all.
    """
    order = annotated + [i for i in range(len(images["before"])) if i not in annotated]
    tiles, captions = [], []
    for start in range(0, min(n, len(order)), columns):
        chunk = order[start : min(start + columns, n)]
        for stage in ("before", "after"):
            tiles += [images[stage][i] for i in chunk] + [None] * (columns - len(chunk))
            captions += [f"{stage} #{i}" for i in chunk] + [""] * (columns - len(chunk))
    return captioned_grid(tiles, captions, columns)
