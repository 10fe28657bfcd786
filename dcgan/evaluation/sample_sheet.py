"""The numbered sample sheet: fixed z's the user picks exemplars and draws boxes on.

The sheet's z's depend only on the run's nz and noise distribution (seed SHEET_SEED), so an
index names the same z in every evaluation of a run; the images change with the checkpoint.
Vector arithmetic (`arithmetic.py`) and feature-map removal (`feature_removal.py`) take
indices into this sheet.
"""

from __future__ import annotations

import numpy as np
import torch

from dcgan.evaluation.figures import captioned_grid
from dcgan.evaluation.quality import prior_noise

SHEET_SIZE = 100
SHEET_COLUMNS = 10
SHEET_SEED = 2015


def sheet_noise(cfg: dict) -> torch.Tensor:
    """(SHEET_SIZE, nz) z's of a run's sheet, from its prior (uniform [-1, 1] or standard normal)."""
    return prior_noise(cfg["nz"], cfg.get("noise", "uniform"), SHEET_SIZE, SHEET_SEED)


def numbered_sheet(images: np.ndarray) -> np.ndarray:
    """The samples in a grid of SHEET_COLUMNS, each under its index."""
    return captioned_grid(list(images), [f"#{i}" for i in range(len(images))], SHEET_COLUMNS)
