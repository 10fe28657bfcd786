"""`verify`: is a work directory whole? Every stage's checks, without changing anything (a flow, for schedules)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from dcgan.integrity import check_registry, check_training
from dedup.integrity import check_dedup
from preprocessing.errors import UserError
from preprocessing.integrity import Findings, check_extract, check_reads, check_shards, note_unchecked, ok_items


def verify_work(work: Path, data: bool = False) -> Findings:
    """Parse every index, check the accounting and the files they name; with `data`, every recorded sha256.

    Checks run in DAG order; a damaged index of one stage is reported, and the stages after it are
    checked as far as they can be without it.
    """
    work = Path(work)
    if not work.is_dir():
        raise UserError(f"no work directory at {work}")
    found = check_extract(work, data)
    ok = ok_items(work)
    deduped, kept = check_dedup(work, ok)
    found.merge(deduped)
    expected = [k for k in (kept, ok) if k is not None] if ok is not None else None
    found.merge(check_shards(work, expected, data))
    found.merge(check_training(work, data))
    found.merge(check_registry(work))
    if data:
        check_reads(found)
    note_unchecked(found)
    return found


@flow(name="verify")
def verify_flow(work: str, data: bool = False) -> dict:
    """Check a work directory without changing it; the problems are logged, one line each, with their repair.

    The flow run fails when the directory is not whole, so a schedule's failed run is the alert.
    """
    found = verify_work(Path(work), data)
    log = get_run_logger()
    for problem in found.problems:
        log.error(problem.line())
    for note in found.notes:
        log.info("note: %s", note)
    result = found.as_dict()
    if found.problems:
        raise WorkNotWhole(f"{work} is not whole: {len(found.problems)} problems (first: {found.problems[0].line()})")
    log.info("%s is whole (%s)", work, result["checked"])
    return result


class WorkNotWhole(Exception):
    """Raised by the flow so that its run ends Failed (the CLI prints the lines itself and exits 2)."""
