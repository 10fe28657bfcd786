"""Progress of the evaluation's long steps: a tqdm bar on a terminal, log lines everywhere.

The log lines go through `logging` under the `dcgan` namespace, so a Prefect flow run shows
them (PREFECT_LOGGING_EXTRA_LOGGERS=dcgan) and a plain script shows them with basicConfig.
They come at most every `log_every_s` seconds, plus one for every step given a message and
one at the end, so a 30-minute step is never silent and a short one is not noisy.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """'42s', '3m05s' or '1h02m': short enough for a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts steps of one long task; logs elapsed time and an ETA from the mean step so far."""

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        unit: str = "step",
        logger: logging.Logger = log,
        log_every_s: float = 30.0,
        pace: str = "mean",
    ) -> None:
        """`pace` "last" estimates the ETA from the latest step instead of the mean: for steps that
        grow dearer one after another (the C grid's larger C values)."""
        if pace not in ("mean", "last"):
            raise ValueError(f"pace must be mean or last, got {pace!r}")
        self.desc, self.total, self.unit, self.logger, self.log_every_s = desc, total, unit, logger, log_every_s
        self.pace, self.done, self.last_pace = pace, 0, 0.0
        self.start = self.last_log = self.last_update = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if sys.stderr.isatty() else None

    def eta(self) -> float | None:
        """Seconds left at the mean (or the latest) pace so far; None before the first step."""
        if self.done == 0:
            return None
        per_step = self.last_pace if self.pace == "last" else (time.perf_counter() - self.start) / self.done
        return per_step * max(0, self.total - self.done)

    def set_total(self, total: int) -> None:
        """Grow or shrink the task (the C grid extends itself)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: int = 1, message: str | None = None) -> None:
        """Count n steps; a message is always logged, otherwise at most every log_every_s."""
        self.done += n
        now = time.perf_counter()
        if n:
            self.last_pace, self.last_update = (now - self.last_update) / n, now
        if self.bar is not None:
            self.bar.update(n)
            if message:
                self.bar.set_postfix_str(message, refresh=True)
        if message or now - self.last_log >= self.log_every_s:
            self.last_log = now
            eta = self.eta()
            self.logger.info(
                "%s: %d/%d %s%s (%s elapsed, ETA %s)",
                self.desc,
                self.done,
                self.total,
                self.unit,
                f": {message}" if message else "",
                duration(now - self.start),
                "?" if eta is None else duration(eta),
            )

    def close(self) -> float:
        """End the bar, log the total time and return it in seconds."""
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        self.logger.info("%s: done, %d %s in %s", self.desc, self.done, self.unit, duration(seconds))
        return seconds

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()
