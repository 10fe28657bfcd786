"""One process pool recipe for the Prefect-free stage drivers."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """Fork when the caller is single-threaded (workers start in ms), else spawn (fork with
    threads can deadlock; spawn costs 1.5-2.5 s of imports per pool here). `initializer` runs
    in each worker first, e.g. to drop handles inherited through fork."""
    method = "fork" if threading.active_count() == 1 else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=initializer)
