"""One process pool recipe for the Prefect-free stage drivers."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor


def _fresh_worker() -> None:
    """Forked workers must not reuse the parent's LMDB handles: each opens its own."""
    from preprocessing import lsun

    lsun._ENVS.clear()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Fork when the caller is single-threaded (workers start in ms), else spawn (fork with
    threads can deadlock; spawn costs 1.5-2.5 s of imports per pool here)."""
    method = "fork" if threading.active_count() == 1 else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_fresh_worker)
