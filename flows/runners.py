"""The task runner of a mapped stage, from its RunnerSettings: a process pool or a Dask cluster.

Only the parts of a stage (one task per part) go to the runner, inside a subflow; planning and
merging stay in the calling flow. A Dask cluster given by address is checked before any work:
the scheduler answers, it has workers, and every worker sees the paths the parts read and
write (shared storage), so a missing mount is one clear error naming the worker and the path
instead of a task that fails or hangs later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from preprocessing.errors import UserError
from preprocessing.settings import RunnerSettings

CONNECT_TIMEOUT_S = 5


class RunnerError(UserError):
    """A Dask cluster that cannot be reached or cannot see the stage's files."""


def task_runner(runner: RunnerSettings) -> TaskRunner:
    if runner.type == "process":
        return ProcessPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runner.workers,
            "threads_per_worker": 1,  # parts are CPU-bound: one per process, like the process pool
            "dashboard_address": None,
            "silence_logs": logging.WARNING,
        },
    )


def missing_paths(paths: Sequence[str]) -> list[str]:
    """The paths of `paths` that do not exist here (run on each Dask worker)."""
    return [p for p in paths if not os.path.exists(p)]


def check_runner(runner: RunnerSettings, inputs: Sequence[str | Path], work: str | Path) -> None:
    """Before any work: an existing cluster answers, has workers, and each worker sees the inputs and `work`.

    A work directory that does not exist yet is checked as its nearest existing parent, where
    this machine will create it.
    """
    if runner.type != "dask" or runner.address is None:
        return
    from distributed import Client

    try:
        client = Client(runner.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise RunnerError(f"cannot reach the Dask scheduler at {runner.address}: {exc}") from None
    try:
        workers = client.scheduler_info()["workers"]
        if not workers:
            raise RunnerError(f"the Dask cluster at {runner.address} has no workers")
        wanted = [str(Path(p).resolve()) for p in inputs] + [str(_existing_ancestor(Path(work).resolve()))]
        for worker, missing in sorted(client.run(missing_paths, wanted).items()):
            if missing:
                raise RunnerError(
                    f"Dask worker {worker} cannot see {missing[0]}"
                    + (f" (and {len(missing) - 1} more paths)" if len(missing) > 1 else "")
                    + ": every worker needs the inputs and the work directory at the same paths (shared storage)"
                )
    finally:
        client.close()


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
