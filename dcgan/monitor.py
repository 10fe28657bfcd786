"""What a training run shows while it runs: TensorBoard events and a progress bar.

TensorBoard event files go to `<run>/tensorboard` (losses, D(x), D(G(z)), img/s, learning
rate, SWD at checkpoints, the fixed-noise sample grid). Without the `tensorboard` package (e.g. a bare GPU
box) training goes on with one warning; metrics.jsonl is always written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, run_dir: Path, *, tensorboard: bool, progress: bool | None, start: int, total: int) -> None:
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: no event files (metrics.jsonl is still written)")
            else:
                # purge_step drops events a resumed or rolled-back run is about to write again
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start or None)
        show = sys.stderr.isatty() if progress is None else progress
        self.bar = tqdm(total=total, initial=start, disable=not show, unit="step", dynamic_ncols=True, leave=True)

    def scalars(self, step: int, row: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        self.bar.set_postfix(
            loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}", img_s=f"{row['img_per_s']:.0f}", refresh=False
        )

    def quality(self, step: int, swd: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("quality/swd", swd, step)

    def samples(self, step: int, grid: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_image("samples", grid, step)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def rewind(self, step: int) -> None:
        """After a rollback: the bar and the event files restart at `step`."""
        self.bar.n = step
        self.bar.refresh()
        if self.writer is not None:
            logdir = self.writer.log_dir
            self.writer.close()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logdir, purge_step=step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
