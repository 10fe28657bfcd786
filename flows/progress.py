"""Stage progress on the pipeline's own flow run, where `prefect deployment run ... --watch` shows it.

`--watch` (prefect 3.9: `prefect.cli.flow_runs_watching`) prints the logs whose flow run is the
watched run and the events that name it. Each pipeline stage is a subflow, a flow run of its own,
so its logs (the stage's progress) and its state changes never show there: a watched `pipeline/full`
run said nothing while its stages ran. `follow_subflows()`, called at the start of a flow, sends a
copy of every log record of that flow's subflow runs (nested ones too) to the flow's own run, as
`<stage flow>: <message>`. The copies go to the API only (the console shows the originals once).
"""

from __future__ import annotations

import logging
import threading
from uuid import UUID

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS

# Where a stage's records come from: the run loggers (get_run_logger of its flows and tasks, Prefect's
# "Finished in state ..." lines) and the domain packages' progress loggers (prefect.toml extra_loggers).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
MAX_DEPTH = 8  # subflow nesting followed upwards

_followed: set[UUID] = set()
_parents: dict[UUID, UUID | None] = {}  # flow run -> its parent flow run (None: a top-level run)
_install_lock = threading.Lock()
_handler: _ForwardToParent | None = None


def _as_uuid(value: object) -> UUID | None:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        return None


def _parent_flow_run(run_id: UUID) -> UUID | None:
    """The flow run that started `run_id` as a subflow (cached: one or two API reads per flow run)."""
    if run_id in _parents:
        return _parents[run_id]
    from prefect.client.orchestration import get_client

    ctx = FlowRunContext.get()
    parent = None
    with get_client(sync_client=True) as client:
        if ctx is not None and ctx.flow_run is not None and ctx.flow_run.id == run_id:
            task_run_id = ctx.flow_run.parent_task_run_id
        else:
            task_run_id = client.read_flow_run(run_id).parent_task_run_id
        if task_run_id is not None:  # a subflow runs under a task run of its parent flow run
            parent = client.read_task_run(task_run_id).flow_run_id
    _parents[run_id] = parent
    return parent


def _followed_ancestor(run_id: UUID) -> UUID | None:
    for _ in range(MAX_DEPTH):
        parent = _parent_flow_run(run_id)
        if parent is None or parent in _followed:
            return parent
        run_id = parent
    return None


def _record_run(record: logging.LogRecord) -> tuple[UUID | None, str]:
    """(flow run, flow name) a record belongs to: its own attributes (run loggers) or the run context."""
    run_id = _as_uuid(getattr(record, "flow_run_id", None))
    name = getattr(record, "flow_name", None)
    ctx = FlowRunContext.get()
    if run_id is None:
        if ctx is not None and ctx.flow_run is not None:
            run_id = ctx.flow_run.id
        elif (task_ctx := TaskRunContext.get()) is not None:
            run_id = task_ctx.task_run.flow_run_id
    if not name or name == "<unknown>":
        name = ctx.flow.name if ctx is not None and ctx.flow_run is not None and ctx.flow_run.id == run_id else ""
    return run_id, name or "subflow"


class _ForwardToParent(logging.Handler):
    """Copies a subflow run's records to the followed flow run above it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._api = APILogHandler()
        self._busy = threading.local()  # the API reads below may log: never forward from inside emit

    def emit(self, record: logging.LogRecord) -> None:
        if not _followed or getattr(self._busy, "on", False) or not getattr(record, "send_to_api", True):
            return
        self._busy.on = True
        try:
            run_id, stage = _record_run(record)
            if run_id is None or run_id in _followed:
                return  # outside any flow run, or the followed run's own record (already there)
            target = _followed_ancestor(run_id)
            if target is None:
                return
            copy = logging.makeLogRecord(record.__dict__)
            copy.msg, copy.args = f"{stage}: {record.getMessage()}", ()
            copy.flow_run_id, copy.task_run_id = target, None
            self._api.handle(copy)
        except Exception:  # noqa: BLE001 - progress copies must never break a stage's logging
            pass
        finally:
            self._busy.on = False


def follow_subflows() -> None:
    """Show the progress of every subflow of the current flow run on that run (see the module doc).

    Call it at the start of a flow's body; outside a flow run it does nothing. The records of
    subflow runs are copied for as long as the process lives; a run that is not below a followed
    flow run (a stage flow called on its own) is never copied anywhere.
    """
    global _handler
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    _followed.add(ctx.flow_run.id)
    with _install_lock:
        if _handler is None:
            _handler = _ForwardToParent()
            for name in (*RUN_LOGGERS, *(PREFECT_LOGGING_EXTRA_LOGGERS.value() or [])):
                logging.getLogger(name).addHandler(_handler)
