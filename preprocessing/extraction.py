"""One extraction engine for every source kind: plan parts over inputs, run a part, merge the manifests.

A source kind (an LSUN LMDB, a photo folder, tar or table) lists its inputs, each with an identity
and a cheap fingerprint, and turns the inputs of one part into manifest rows and staging samples.
Everything else is written once, here. `inputs.parquet` records the part that covers each input,
so rerunning on a grown source appends parts for the new inputs only. A finished part is
immutable: its manifest is renamed into place last, so a part is complete or absent, and it is never
redone or rewritten; the manifest's Parquet metadata holds the sha256 of the part's tar. The
merged manifest accounts for every input exactly once, including inputs that have left the
source (status `gone`). An input that changed under its old identity is refused,
never mixed with its old crops.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.atomic import atomic_write_json
from preprocessing.errors import UserError
from preprocessing.manifest import write_table
from preprocessing.state import read_json, read_parquet
from preprocessing.tar_shards import TarShardWriter

log = logging.getLogger(__name__)

PLAN = "plan.json"
TAR_SHA256 = "tar_sha256"  # key of a part manifest's Parquet metadata: the sha256 of its tar, as written
TAR_KEYS = "tar_keys_sha256"  # ... and the digest of the sample keys written into it
INDEX = "inputs.parquet"
FORMAT = 2
# Columns the engine adds to a kind's index columns in inputs.parquet.
ENGINE_FIELDS = [("fingerprint", pa.string()), ("part", pa.int32()), ("gone", pa.bool_())]
# Keys that plans before format 2 kept among their settings although they describe the inputs.
LEGACY_INPUT_KEYS = ("fingerprint",)
GONE = "gone"


class SourceKind(Protocol):
    """What the engine needs from a kind of source; everything else about the source stays in its module."""

    name: str  # recorded in plan.json: "lsun", "folder", "tar", "table"
    identity: str  # the column naming an input, in inputs.parquet and in the manifest
    display: str  # the index column that names an input to the user (a path, a key)
    index_schema: pa.Schema  # the kind's columns of inputs.parquet (locators), identity included
    manifest_schema: pa.Schema
    error: type[UserError]

    def source_fingerprint(self) -> str | None:
        """Cheap identity of the whole source: unchanged means no input was added, removed or changed."""
        ...

    def list_inputs(self) -> pa.Table:
        """Every input now in the source, in processing order: index_schema plus a `fingerprint` column."""
        ...

    def legacy_index(self, out_dir: Path, plan: dict, listing: pa.Table) -> tuple[pa.Table, int]:
        """(index, part count) rebuilt from a plan written before format 2; null fingerprints are adopted."""
        ...

    def process(self, part: int, refs: list[dict]) -> Iterator[tuple[dict, dict[str, bytes] | None]]:
        """Yield (manifest row, sample files or None) for the inputs of one part, in order."""
        ...


@dataclass(frozen=True)
class ExtractionPlan:
    """The parts of a source and what this rerun changes; `todo` lists the parts still to run."""

    parts: int
    inputs: int
    todo: list[int] = field(default_factory=list)
    new_inputs: int = 0
    new_parts: int = 0
    reused_parts: int = 0
    gone: int = 0
    newly_gone: int = 0
    returned: int = 0
    changed: int = 0


def part_stem(part: int) -> str:
    return f"part-{part:06d}"


def index_schema(kind: SourceKind) -> pa.Schema:
    return pa.schema(list(kind.index_schema) + ENGINE_FIELDS)


def complete_parts(out_dir: Path, parts: int) -> set[int]:
    """Parts whose manifest is in place (written last, so the part is complete and final)."""
    return {i for i in range(parts) if (out_dir / f"{part_stem(i)}.parquet").exists()}


def check_settings(out_dir: Path, plan: dict, settings: dict[str, Any], error: type[UserError]) -> None:
    """Refuse to extend an extraction made with other settings: the user must refresh it on purpose."""
    recorded = plan["settings"]
    if "format" not in plan:
        recorded = {k: v for k, v in recorded.items() if k not in LEGACY_INPUT_KEYS}
    if recorded != settings:
        changed = sorted(k for k in set(settings) | set(recorded) if recorded.get(k) != settings.get(k))
        raise error(
            f"{out_dir} holds an extraction with other {', '.join(changed)}; "
            "refresh this stage to redo it (CLI: --refresh)"
        )


def plan_extraction(out_dir: Path, kind: SourceKind, settings: dict[str, Any], part_size: int) -> ExtractionPlan:
    """Plan (or extend the plan of) the extraction of `kind` into `out_dir`.

    New inputs get new parts, numbered after the existing ones; inputs of finished parts that left
    the source are kept and marked gone; inputs of unfinished parts are taken as listed now. Nothing
    is written when nothing changed; an error leaves the directory as it was.
    """
    plan_path = out_dir / PLAN
    plan = read_json(plan_path, refresh_hint(out_dir)) if plan_path.exists() else None
    if plan is not None:
        check_settings(out_dir, plan, settings, kind.error)
    source_fp = kind.source_fingerprint()
    indexed = plan is not None and plan.get("format") == FORMAT and (out_dir / INDEX).exists()
    if indexed and source_fp is not None and plan["source_fingerprint"] == source_fp:
        done = complete_parts(out_dir, plan["parts"])
        todo = [i for i in range(plan["parts"]) if i not in done]
        return ExtractionPlan(plan["parts"], plan["inputs"], todo, reused_parts=len(done), gone=plan["gone"])
    listing = kind.list_inputs()
    if len(pc.unique(listing[kind.identity])) != listing.num_rows:
        raise kind.error(f"{out_dir.name}: the source lists some inputs twice (duplicate keys)")
    recorded: pa.Table | None = None
    parts = 0
    if plan is not None:
        if plan.get("format") == FORMAT and not (out_dir / INDEX).exists():
            raise kind.error(f"{out_dir}: {INDEX} is missing; refresh this stage to redo it (CLI: --refresh)")
        if plan.get("format") == FORMAT or _has_part_column(out_dir / INDEX):
            recorded = read_parquet(out_dir / INDEX, refresh_hint(out_dir), schema=index_schema(kind))
            parts = plan["parts"] if plan.get("format") == FORMAT else _part_count(recorded)
        else:
            recorded, parts = kind.legacy_index(out_dir, plan, listing)
            recorded = recorded.cast(index_schema(kind))
    done = complete_parts(out_dir, parts)
    index, result = reconcile(recorded, listing, done, parts, part_size, kind)
    if result.changed:
        raise kind.error(_changed_message(out_dir, result.changed, index, kind))
    new_plan = {
        "format": FORMAT,
        "kind": kind.name,
        "settings": settings,
        "source_fingerprint": source_fp,
        "parts": result.parts,
        "inputs": result.inputs,
        "gone": result.gone,
    }
    if recorded is None or not index.equals(recorded):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_table(index, out_dir / INDEX)  # the index first: a plan.json never names parts it lacks
    if new_plan != plan:
        atomic_write_json(plan_path, new_plan)
    log.info(
        "%s: %d inputs, %d new in %d new parts, %d parts reused, %d gone",
        out_dir.name,
        result.inputs,
        result.new_inputs,
        result.new_parts,
        result.reused_parts,
        result.gone,
    )
    return result


def _has_part_column(path: Path) -> bool:
    return path.exists() and "part" in pq.read_schema(path).names


def _part_count(index: pa.Table) -> int:
    top = pc.max(index["part"]).as_py()
    return 0 if top is None else top + 1


def reconcile(
    recorded: pa.Table | None, listing: pa.Table, done: set[int], parts: int, part_size: int, kind: SourceKind
) -> tuple[pa.Table, ExtractionPlan]:
    """The new index: recorded inputs in their parts (listed now, or gone), then new inputs in new parts.

    On an error of `changed` inputs the returned index holds the changed ones first, for the message.
    """
    schema = index_schema(kind)
    ident = kind.identity
    n = listing.num_rows
    cur = listing.append_column("part", pa.nulls(n, pa.int32())).append_column("gone", pa.repeat(False, n))
    cur = cur.select(schema.names).cast(schema)
    if recorded is None or recorded.num_rows == 0:
        recorded = schema.empty_table()
    at = pc.index_in(recorded[ident], value_set=cur[ident])
    present = pc.is_valid(at)
    finished = pc.is_in(recorded["part"], value_set=pa.array(sorted(done), pa.int32()))
    differs = pc.not_equal(recorded["fingerprint"], cur["fingerprint"].take(at))
    changed = pc.and_(pc.and_(present, finished), pc.and_(pc.is_valid(recorded["fingerprint"]), differs))
    n_changed = pc.sum(pc.fill_null(changed, False)).as_py() or 0
    if n_changed:
        return cur.take(pc.drop_null(pc.filter(at, changed))), ExtractionPlan(parts, 0, changed=n_changed)
    # Each recorded row becomes its listed row (fresh locators and fingerprint) in its part, or stays as gone.
    combined = pa.concat_tables([cur, recorded])
    positions = pc.if_else(present, at.cast(pa.int64()), pa.array(range(n, n + recorded.num_rows), pa.int64()))
    kept = combined.take(positions)
    kept = kept.set_column(schema.get_field_index("part"), "part", recorded["part"])
    gone_now = pc.invert(present)
    kept = kept.set_column(schema.get_field_index("gone"), "gone", gone_now)
    kept = kept.filter(pc.or_(present, finished))  # unfinished parts only hold what is listed now
    is_new = pc.invert(pc.is_in(cur[ident], value_set=recorded[ident]))
    new = cur.filter(is_new)
    new_parts = (new.num_rows + part_size - 1) // part_size
    numbers = pa.array([parts + i // part_size for i in range(new.num_rows)], pa.int32())
    new = new.set_column(schema.get_field_index("part"), "part", numbers)
    index = pa.concat_tables([kept, new]).combine_chunks()
    total_parts = parts + new_parts
    gone_mask = pc.and_(gone_now, finished)
    result = ExtractionPlan(
        parts=total_parts,
        inputs=index.num_rows,
        todo=[i for i in range(total_parts) if i not in done],
        new_inputs=new.num_rows,
        new_parts=new_parts,
        reused_parts=len(done),
        gone=pc.sum(gone_mask).as_py() or 0,
        newly_gone=pc.sum(pc.and_(gone_mask, pc.invert(recorded["gone"]))).as_py() or 0,
        returned=pc.sum(pc.and_(present, recorded["gone"])).as_py() or 0,
    )
    return index, result


def _changed_message(out_dir: Path, n: int, changed: pa.Table, kind: SourceKind) -> str:
    names = changed[kind.display].to_pylist()[:3]
    return (
        f"{out_dir.name}: {n} inputs changed since they were extracted (same name, other content), "
        f"e.g. {', '.join(map(str, names))}; changed inputs are never mixed with their old crops: "
        "refresh this source to redo it (CLI: --refresh), or restore them"
    )


def read_part_inputs(out_dir: Path, part: int) -> list[dict]:
    """The index rows of one part, in processing order."""
    index = read_parquet(out_dir / INDEX, refresh_hint(out_dir))
    return index.filter(pc.equal(index["part"], part)).to_pylist()


def run_part(out_dir: Path, part: int, kind: SourceKind) -> dict:
    """Process one part into `part-NNNNNN.{tar,parquet}`; a part whose manifest exists is final and skipped."""
    stem = part_stem(part)
    manifest_path = out_dir / f"{stem}.parquet"
    if manifest_path.exists():
        done = read_parquet(manifest_path, refresh_hint(out_dir), schema=kind.manifest_schema)
        return part_summary(part, done, kind, 0.0, skipped=True)
    refs = read_part_inputs(out_dir, part)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with TarShardWriter(out_dir / f"{stem}.tar") as tar:
        for row, files in kind.process(part, refs):
            if files is not None:
                tar.write(row["key"], files)
            rows.append(row)
    table = pa.Table.from_pylist(rows, schema=kind.manifest_schema)
    write_table(table.replace_schema_metadata({TAR_SHA256: tar.sha256, TAR_KEYS: tar.keys_sha256()}), manifest_path)
    summary = part_summary(part, table, kind, time.perf_counter() - t0, skipped=False)
    log.info(
        "%s part %d: %d inputs, %d ok, %.1f inputs/s",
        out_dir.name,
        part,
        summary["inputs"],
        summary["ok"],
        summary["inputs"] / max(summary["seconds"], 1e-9),
    )
    return summary


def part_summary(part: int, table: pa.Table, kind: SourceKind, seconds: float, *, skipped: bool) -> dict:
    status = table["status"].to_pylist()
    reasons = Counter(r for r, s in zip(table["reason"].to_pylist(), status, strict=True) if s != "ok")
    return {
        "part": part,
        "inputs": len(pc.unique(table[kind.identity])),
        "rows": table.num_rows,
        "ok": status.count("ok"),
        "rejected": dict(reasons),
        "seconds": seconds,
        "skipped": skipped,
    }


def run_parts(
    job: Callable[[int], dict], parts: list[int], workers: int, pool: Callable[[int], Executor], label: str
) -> list[dict]:
    """Run `job` on each part, in this process for one worker or part, else on `pool(workers)`."""
    if workers == 1 or len(parts) <= 1:
        return [job(p) for p in parts]
    summaries = []
    with pool(workers) as executor:
        for done, summary in enumerate(executor.map(job, parts), 1):
            summaries.append(summary)
            log.info("%s: %d/%d parts", label, done, len(parts))
    return summaries


def merge_manifests(out_dir: Path, kind: SourceKind) -> pa.Table:
    """Concatenate part manifests into `manifest.parquet`, rows of gone inputs marked `gone`.

    Fails loudly on a missing part, a duplicate key, or an input not accounted for exactly once.
    An unchanged manifest is not rewritten, so later stages see no change.
    """
    plan = read_json(out_dir / PLAN, refresh_hint(out_dir))
    paths = [out_dir / f"{part_stem(i)}.parquet" for i in range(plan["parts"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise kind.error(f"{out_dir}: {len(missing)} parts incomplete, e.g. {missing[:3]}")
    schema = kind.manifest_schema
    tables = [read_parquet(p, refresh_hint(out_dir), schema=schema) for p in paths]
    table = pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()
    index = read_parquet(out_dir / INDEX, refresh_hint(out_dir), columns=[kind.identity, "gone"])
    gone = index.filter(index["gone"])[kind.identity]
    if len(gone):
        table = mark_gone(table, pc.is_in(table[kind.identity], value_set=gone))
    accounted = pc.unique(table[kind.identity])
    if len(accounted) != index.num_rows or not pc.all(pc.is_in(index[kind.identity], value_set=accounted)).as_py():
        raise kind.error(f"{out_dir}: the manifest does not account for every input exactly once")
    if len(pc.unique(table["key"])) != table.num_rows:
        raise kind.error(f"{out_dir}: duplicate keys in the manifest")
    target = out_dir / "manifest.parquet"
    if not (target.exists() and _same_table(target, schema, table)):
        write_table(table, target)
    return table


def _same_table(path: Path, schema: pa.Schema, table: pa.Table) -> bool:
    """Whether `path` holds `table` (a damaged merged manifest is not: it is rewritten from the parts)."""
    try:
        return pq.read_table(path, schema=schema).equals(table)
    except (OSError, ValueError, pa.ArrowException):
        log.warning("%s is damaged: rewriting it from the part manifests", path)
        return False


def rerun_hint(out_dir: Path, does: str) -> str:
    """The repair that a plain rerun of the source's extraction makes (it resumes, or migrates)."""
    return (
        f"rerun the extraction of {out_dir.name} (dcgan-pipeline lsun|faces|ingest ... --work {out_dir.parents[1]} "
        f"--name {out_dir.name}): it {does}"
    )


def refresh_hint(out_dir: Path) -> str:
    """The repair for a damaged extraction: redo the source."""
    return (
        f"redo the source {out_dir.name}: rerun its extraction with --refresh "
        f"(dcgan-pipeline lsun|faces|ingest ... --work {out_dir.parents[1]} --name {out_dir.name} --refresh)"
    )


def mark_gone(table: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.Table:
    """Rows of inputs that left the source: status `gone`, the former outcome kept in `detail`."""
    status, reason = table["status"], table["reason"]
    former = pc.if_else(
        pc.is_null(reason),
        pc.binary_join_element_wise("was ", status, ""),
        pc.binary_join_element_wise("was ", status, " (", reason, ")", ""),
    )
    updates = {
        "status": pc.if_else(mask, GONE, status),
        "reason": pc.if_else(mask, "removed_from_source", reason),
        "detail": pc.if_else(mask, former, table["detail"]),
    }
    for name, column in updates.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def manifest_counts(table: pa.Table, identity: str) -> dict:
    """Totals of a merged manifest for reports: inputs, kept crops, gone inputs, rejects by reason."""
    status = table["status"].to_pylist()
    reasons = Counter(r for r, s in zip(table["reason"].to_pylist(), status, strict=True) if s not in ("ok", GONE))
    gone = table.filter(pc.equal(table["status"], GONE))[identity]
    return {
        "inputs": len(pc.unique(table[identity])),
        "rows": table.num_rows,
        "ok": status.count("ok"),
        "gone": len(pc.unique(gone)),
        "rejected": dict(sorted(reasons.items())),
    }


def summarize_plan(plan: ExtractionPlan) -> list[tuple[str, int]]:
    """Report rows of what a rerun did with the source."""
    return [
        ("new inputs", plan.new_inputs),
        ("new parts", plan.new_parts),
        ("parts reused", plan.reused_parts),
        ("inputs gone", plan.gone),
        ("inputs changed", plan.changed),
    ]
