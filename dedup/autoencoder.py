"""The paper's semantic hash: a 3072-128-3072 denoising, dropout-regularised ReLU autoencoder.

Radford et al. (2015, section 4.1.1) fit it on 32x32 center crops and binarise the ReLU code
by thresholding (> 0) into 128 bits. Each crop is first normalised for brightness and
contrast (dedup.contrast: its mean removed, divided by its floored spread), then mapped to
the spread of a typical image in [0, 1] (0.5 +- 0.25) and centred on the training set's mean
input (stored with the weights), so a brighter or flatter copy gets the same code. Training
corrupts inputs with Gaussian noise and drops code units, and stops when the held-out loss
stops improving.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dedup.contrast import normalise
from preprocessing.atomic import atomic_write_bytes
from preprocessing.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "dcgan-pipeline-dedup-autoencoder/2"  # /1 hashed raw crops (not normalised)
OLD_FORMATS = ("dcgan-pipeline-dedup-autoencoder/1",)
INPUT = 32 * 32 * 3
CODE = 128


class AutoencoderError(UserError):
    """A checkpoint that is missing, corrupted, or not this autoencoder."""


@dataclass
class AEConfig:
    noise_std: float = 0.1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 50
    patience: int = 3
    min_improvement: float = 0.005  # relative held-out loss improvement that resets patience
    holdout: float = 0.05
    max_items: int = 200_000  # train on a random subset this large (2.4 GB as float32); all are encoded
    seed: int = 0
    device: str = "cpu"


class DenoisingAutoencoder(nn.Module):
    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Linear(INPUT, CODE)
        self.decoder = nn.Linear(CODE, INPUT)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mean", torch.zeros(INPUT))

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU code of inputs made by `to_input` (N, 3072)."""
        return torch.relu(self.encoder(x - self.mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dropout(self.code(x))) + self.mean


def to_input(crops: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3072) float: normalised crops at the spread of an image in [0, 1]."""
    return normalise(crops).mul_(0.25).add_(0.5)


def train_autoencoder(crops: np.ndarray, cfg: AEConfig) -> tuple[DenoisingAutoencoder, dict[str, Any]]:
    """Fit on uint8 crops (N, 32, 32, 3) until the held-out loss plateaus; returns (model, history)."""
    n = len(crops)
    if n < 1:
        raise ValueError("no images to train the autoencoder on")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if n > cfg.max_items:
        subset = np.sort(torch.randperm(n, generator=g)[: cfg.max_items].numpy())
        crops, n = crops[subset], cfg.max_items
    order = torch.randperm(n, generator=g)
    n_hold = max(1, int(n * cfg.holdout)) if n > 1 else 0
    hold, train = order[:n_hold], order[n_hold:]
    if n_hold == 0:  # a single image: nothing to hold out, so score on it (the run is trivial anyway)
        hold = train
    device = torch.device(cfg.device)
    data = to_input(crops).to(device)
    model = DenoisingAutoencoder(cfg.dropout).to(device)
    model.mean.copy_(data[train].mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_state, stale, history = math.inf, None, 0, []
    t0 = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        model.train()
        perm = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(perm), cfg.batch_size):
            x = data[perm[i : i + cfg.batch_size].to(device)]
            noisy = x + cfg.noise_std * torch.randn(x.shape, generator=None, device=device)
            loss = torch.mean((model(noisy) - x) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            held = float(torch.mean((model(data[hold.to(device)]) - data[hold.to(device)]) ** 2))
        history.append({"epoch": epoch + 1, "holdout_mse": held, "seconds": time.perf_counter() - t0})
        log.info("autoencoder epoch %d: held-out MSE %.5f", epoch + 1, held)
        if held < best * (1 - cfg.min_improvement):
            best, stale = held, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("autoencoder: plateau after %d epochs (best held-out MSE %.5f)", epoch + 1, best)
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return model.cpu(), {
        "epochs": history,
        "best_holdout_mse": best,
        "train_items": len(train),
        "holdout_items": n_hold,
    }


def save_autoencoder(model: DenoisingAutoencoder, cfg: AEConfig, info: dict, path: Path) -> None:
    """Weights, config and training history together; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state": model.state_dict(), "config": asdict(cfg), "info": info}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_autoencoder(path: Path) -> tuple[DenoisingAutoencoder, dict[str, Any]]:
    """Load with weights_only=True; a corrupted or foreign file is a clear AutoencoderError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise AutoencoderError(f"cannot read autoencoder checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(ckpt, dict) and ckpt.get("format") in OLD_FORMATS:
        raise AutoencoderError(
            f"{path} was trained by an older version on crops without brightness/contrast normalisation; "
            "its codes would not match: train a new one (dedup without --autoencoder)"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise AutoencoderError(f"{path} is not a dcgan-pipeline dedup autoencoder checkpoint")
    model = DenoisingAutoencoder(ckpt["config"].get("dropout", 0.2))
    try:
        model.load_state_dict(ckpt["state"])
    except RuntimeError as exc:
        raise AutoencoderError(f"{path} does not hold a 3072-128-3072 autoencoder: {exc}") from exc
    model.eval()
    return model, ckpt


@torch.no_grad()
def encode_bits(model: DenoisingAutoencoder, crops: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Binarised codes: (N, 16) uint8, bit i set where code unit i is > 0 (the paper's threshold)."""
    out = np.empty((len(crops), CODE // 8), np.uint8)
    for i in range(0, len(crops), batch):
        active = (model.code(to_input(crops[i : i + batch])) > 0).numpy()
        out[i : i + batch] = np.packbits(active, axis=1)
    return out
