"""Process-level plumbing that Prefect leaves to the caller."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.context import FlowRunContext


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
