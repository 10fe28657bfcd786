"""Process-level plumbing that Prefect leaves to the caller."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext

from preprocessing.errors import UserError
from preprocessing.locks import LOCKS, LockSettings, command_line, hold, is_held, lock_path


@contextmanager
def api_shared_with_subprocesses() -> Iterator[None]:
    """Point process-pool workers started inside this block at this flow's API.

    Without a configured PREFECT_API_URL, Prefect runs flows against a temporary server, and
    every worker process of a ProcessPoolTaskRunner would start its own (10-20 s each, and
    their task runs would not show up in this flow). Exporting the URL in use avoids both.
    """
    ctx = FlowRunContext.get()
    if os.environ.get("PREFECT_API_URL") or ctx is None:
        yield
        return
    os.environ["PREFECT_API_URL"] = str(ctx.client.api_url).rstrip("/")
    try:
        yield
    finally:
        del os.environ["PREFECT_API_URL"]


def retry_unless_user_error(task: Any, task_run: Any, state: State) -> bool:
    """Retry condition for Prefect tasks: flaky I/O is retried, a UserError fails at once (it would again)."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may be transient
        return True
    return True


def lock_holder() -> str:
    """How a stage's lock names its holder: the deployment and flow run, or this process's command line."""
    from prefect.runtime import deployment, flow_run

    run = flow_run.name if FlowRunContext.get() is not None else None
    if run and deployment.name:
        return f"deployment {flow_run.flow_name}/{deployment.name}, flow run {run}"
    return f"{command_line()} (flow run {run})" if run else command_line()


@contextmanager
def stage_lock(work: str | Path, name: str, what: str, lock: LockSettings) -> Iterator[None]:
    """Hold `<work>/locks/<name>.lock` for a stage's whole run (see preprocessing.locks).

    A stage that fails before writing anything into a work directory it would have created
    leaves no directory behind (not even the lock).
    """
    work = Path(work)
    created = not work.exists()
    try:
        with hold(lock_path(work, name), what, lock, command=lock_holder()):
            yield
    finally:
        if created and [p.name for p in work.iterdir()] == [LOCKS] and not is_held(lock_path(work, name)):
            shutil.rmtree(work, ignore_errors=True)
