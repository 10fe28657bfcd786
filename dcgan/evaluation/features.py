"""Discriminator features as in the paper's section 5.1.

Every convolutional layer's activations (after its nonlinearity), each max-pooled to a 4x4
grid, flattened and concatenated. For the paper's 32 px ImageNet discriminator
(`dcgan.models.ImageNetDiscriminator32`) that is exactly 28,672 features.
Features are written batch by batch into one float16 array, so 50k CIFAR images at 28,672-d
take 2.9 GB instead of 11 GB.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.evaluation.progress import Progress
from dcgan.precision import use_bfloat16


def conv_outputs(model: nn.Module) -> list[nn.Module]:
    """The module after each hidden convolution whose output is that layer's representation.

    A conv followed by batchnorm and an activation is represented by the activation; the last
    convolution (the real/fake logit) is not a feature layer.
    """
    layers = [m for m in model.modules() if not list(m.children())]
    picks = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            j = i + 1
            while j < len(layers) and isinstance(layers[j], nn.BatchNorm2d | nn.LeakyReLU | nn.ReLU | nn.Dropout):
                j += 1
            picks.append(layers[j - 1])
    return picks[:-1]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch: int = 256,
    device: str = "cpu",
    to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, F) float16 features of every conv layer, max-pooled to 4x4.

    With `progress` (a label), a bar on a terminal and log lines report images done and the ETA.
    `precision` "bf16" (or "auto", where bfloat16 is faster) runs the model under bfloat16 autocast.
    """
    low = use_bfloat16(precision, device)
    model = model.eval().to(device)
    taps = conv_outputs(model)
    captured: list[torch.Tensor] = []
    hooks = [t.register_forward_hook(lambda _m, _i, out: captured.append(out)) for t in taps]
    bar = Progress(progress, len(images), unit="images") if progress else None
    out = np.zeros((0, 0), np.float16)
    try:
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
            x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if to_input is not None:
                x = to_input(x)
            captured.clear()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low):
                model(x)
            rows = torch.cat([F.adaptive_max_pool2d(a, 4).flatten(1) for a in captured], 1)
            if i == 0:  # one array for all rows: no list of blocks to concatenate (twice the memory)
                out = np.empty((len(images), rows.shape[1]), np.float16)
            out[i : i + len(rows)] = rows.to(torch.float16).cpu().numpy()
            if bar is not None:
                bar.update(len(x))
    finally:
        for h in hooks:
            h.remove()
    if bar is not None:
        bar.close()
    return out


def feature_size(model: nn.Module, resolution: int) -> int:
    """Length of the feature vector, from one forward pass on a blank image."""
    blank = np.zeros((1, resolution, resolution, 3), np.uint8)
    return extract_features(model, blank).shape[1]
