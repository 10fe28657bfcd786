"""Is a work directory whole? The checks of the extraction and the shards, and the streaming checksum.

Each check reads, never writes, and returns `Problem`s: the stage, the file, what is wrong and
the command that repairs it. `Notes` are what cannot be checked (files written before
checksums were recorded). `dcgan-pipeline verify` (flows/verify.py) runs these with the dedup
and training checks (dedup/integrity.py, dcgan/integrity.py).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.extraction import FORMAT, INDEX, PLAN, TAR_KEYS, TAR_SHA256, part_stem, refresh_hint, rerun_hint
from preprocessing.sharding import SAMPLES, VERSIONS, extracted_sources, read_index, shard_repair
from preprocessing.state import DamagedStateError, read_json, read_parquet, read_parquet_metadata
from preprocessing.tar_shards import keys_digest, split_member_name

CHUNK = 1 << 20


@dataclass(frozen=True)
class Problem:
    stage: str  # extract/<source>, dedup, shards, train/<run>, registry
    path: str
    problem: str
    repair: str

    def line(self) -> str:
        return f"{self.stage}: {self.problem} -> {self.repair}"


@dataclass(frozen=True)
class Read:
    """A file `--data` reads once: its sha256 against the recorded one (None: none was recorded) and, for a
    tar, the sample keys its index names (`members`). When the tar's bytes match their recorded sha256, the
    keys are told by the digest recorded with them (`keys_sha256`); only a tar without both is parsed."""

    stage: str
    path: Path
    sha256: str | None
    repair: str
    members: frozenset[str] | None = None
    keys_sha256: str | None = None

    @property
    def parse(self) -> bool:
        return self.members is not None and not (self.sha256 and self.keys_sha256)


@dataclass
class Findings:
    """What a check found: problems (the directory is not whole), notes, and what it looked at."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: Counter = field(default_factory=Counter)
    to_read: list[Read] = field(default_factory=list)  # with --data: files to read once and check

    def add(self, stage: str, path: Path, problem: str, repair: str) -> None:
        self.problems.append(Problem(stage, str(path), problem, repair))

    def damaged(self, stage: str, exc: DamagedStateError) -> None:
        """A DamagedStateError (message `<path> is damaged (...) -> <repair>`) as a problem."""
        problem, _, repair = str(exc).partition(" -> ")
        self.problems.append(Problem(stage, problem.split(" ", 1)[0], problem, repair))

    def merge(self, other: Findings) -> None:
        self.problems += other.problems
        self.notes += other.notes
        self.checked.update(other.checked)
        self.to_read += other.to_read

    def as_dict(self) -> dict:
        return {
            "whole": not self.problems,
            "problems": [asdict(p) for p in self.problems],
            "notes": self.notes,
            "checked": dict(self.checked),
        }


def read_file(path: Path, tar: bool) -> tuple[str, set[str] | None]:
    """(sha256, sample keys of a tar) in one streamed read of 1 MiB blocks.

    hashlib drops the GIL, so files hash in parallel threads. A tar's USTAR headers sit on 512-byte
    boundaries, which never straddle a 1 MiB block, so each is read where it lies in its block:
    the member list costs no second read (tarfile's own parser would take 10x the hashing time).
    """
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    keys: set[str] = set()
    at = header = 0  # file offsets of this block and of the next header
    ended = not tar
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            while not ended and header + 512 <= at + n:
                head = bytes(view[header - at : header - at + 512])
                if head.count(0) == 512:  # the end-of-archive blocks
                    ended = True
                    break
                name, size = _member(head)
                keys.add(split_member_name(name)[0])
                header += 512 + -(-size // 512) * 512
            at += n
    return digest.hexdigest(), keys if tar else None


def _member(head: bytes) -> tuple[str, int]:
    """(name, size) from a USTAR header (the prefix field holds the start of long names)."""
    name = head[:100].rstrip(b"\0").decode()
    if head[257:262] == b"ustar" and head[345:500].strip(b"\0"):
        name = head[345:500].rstrip(b"\0").decode() + "/" + name
    return name, int(head[124:136].strip(b"\0 ") or b"0", 8)


def check_reads(findings: Findings, workers: int | None = None) -> None:
    """Read every file queued in `findings.to_read` once, one thread per core, and record what does not match."""
    jobs = findings.to_read
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(_read_or_error, jobs))
    for job, (sha, keys, error) in zip(jobs, results, strict=True):
        findings.checked["files read"] += 1
        findings.checked["bytes read"] += job.path.stat().st_size if job.path.exists() else 0
        if error:
            findings.add(job.stage, job.path, f"{job.path.name}: {error}", job.repair)
            continue
        if job.sha256 is None:
            findings.checked[f"{'shard' if job.stage == 'shards' else 'staging'} tars without a checksum"] += 1
        elif sha != job.sha256:
            what = f"checksum mismatch ({sha[:12]}, recorded {job.sha256[:12]})"
            findings.add(job.stage, job.path, f"{job.path.name}: {what}", job.repair)
        if job.members is None:
            continue
        said = keys_digest(job.members) == job.keys_sha256 if keys is None else job.members == keys
        if not said:
            detail = "" if keys is None else f" ({len(job.members - keys)} missing, {len(keys - job.members)} others)"
            findings.add(
                job.stage, job.path, f"{job.path.name} does not hold the samples its index names{detail}", job.repair
            )


def _read_or_error(job: Read) -> tuple[str, set[str] | None, str | None]:
    try:
        sha, keys = read_file(job.path, tar=job.parse)
    except OSError as exc:
        return "", None, f"unreadable ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError) as exc:
        return "", None, f"cannot be read as a tar ({exc})"
    return sha, keys, None


def ok_items(work: Path) -> set[str] | None:
    """`<source>/<key>` of every ok item (the shards' sample keys); None when a manifest does not read."""
    items: set[str] = set()
    for src in extracted_sources(work):
        try:
            table = pq.read_table(src / "manifest.parquet", columns=["key", "status"])
        except Exception:  # noqa: BLE001 - reported by check_extract
            return None
        items.update(f"{src.name}/{k}" for k in table.filter(pc.equal(table["status"], "ok"))["key"].to_pylist())
    return items


def check_extract(work: Path, data: bool) -> Findings:
    """Every extracted source: plan, input index, parts, manifest and its accounting; with `data`, the tars."""
    found = Findings()
    for src in sorted(p for p in (Path(work) / "extract").glob("*") if p.is_dir()):
        stage, repair = f"extract/{src.name}", refresh_hint(src)
        try:
            _check_source(src, stage, repair, data, found)
        except DamagedStateError as exc:
            found.damaged(stage, exc)
        found.checked["sources"] += 1
    return found


def _check_source(src: Path, stage: str, repair: str, data: bool, found: Findings) -> None:
    plan = read_json(src / PLAN, repair)
    if plan.get("format") != FORMAT:
        migrate = rerun_hint(src, "migrates the source without extracting it again")
        found.add(stage, src / PLAN, f"written by an older version (format {plan.get('format', 1)})", migrate)
        return
    inputs = read_parquet(src / INDEX, repair)
    identity = "photo_key" if "photo_key" in inputs.column_names else "key"
    for part in range(plan["parts"]):
        manifest, tar = src / f"{part_stem(part)}.parquet", src / f"{part_stem(part)}.tar"
        if not manifest.exists():
            found.add(stage, manifest, f"part {part} is incomplete", rerun_hint(src, "finishes the missing parts"))
            continue
        meta = read_parquet_metadata(manifest, repair).schema.to_arrow_schema().metadata or {}
        if not tar.exists():
            found.add(stage, tar, f"{tar.name} is missing", repair)
            continue
        found.checked["staging tars"] += 1
        if data:
            ok = read_parquet(manifest, repair, columns=["key", "status"])
            keys = frozenset(ok.filter(pc.equal(ok["status"], "ok"))["key"].to_pylist())
            sha, written = (meta[k.encode()].decode() if k.encode() in meta else None for k in (TAR_SHA256, TAR_KEYS))
            found.to_read.append(Read(stage, tar, sha, repair, keys, written))
    manifest = read_parquet(src / "manifest.parquet", repair)
    found.checked["manifest rows"] += manifest.num_rows
    counts = Counter(manifest[identity].to_pylist())
    listed = inputs[identity].to_pylist()
    missing = [i for i in listed if i not in counts]
    extra = set(counts) - set(listed)
    if missing or extra:
        example = (missing or sorted(extra))[0]
        found.add(
            stage,
            src / "manifest.parquet",
            f"the manifest does not account for every input once ({len(missing)} missing, {len(extra)} unknown, "
            f"e.g. {example})",
            repair,
        )
    if manifest.num_rows != len(pc.unique(manifest["key"])):
        found.add(stage, src / "manifest.parquet", "the manifest has duplicate keys", repair)


def check_shards(work: Path, expected: list[set[str]] | None, data: bool) -> Findings:
    """The shards: index, versions, samples.parquet, the files, and every kept item once; with `data`, the tars.

    `expected`: the sample keys the shards may hold (dedup's kept items, or every ok item for
    shards written with dedup off); None when they cannot be known (a damaged manifest or codes).
    """
    found = Findings()
    shards = Path(work) / "shards"
    if not (shards / "index.json").exists():
        if shards.exists():
            found.add("shards", shards / "index.json", "index.json is missing", shard_repair(shards))
        return found
    repair = shard_repair(shards)
    try:
        _check_shards(work, shards, repair, expected, data, found)
    except DamagedStateError as exc:
        found.damaged("shards", exc)
    except ValueError as exc:  # a ShardError: an index that is not ours
        found.add("shards", shards / "index.json", str(exc).split(" -> ")[0], repair)
    return found


def _check_shards(
    work: Path, shards: Path, repair: str, expected: list[set[str]] | None, data: bool, found: Findings
) -> None:
    index = read_index(shards)
    versions = read_json(shards / VERSIONS, repair) if (shards / VERSIONS).exists() else []
    version = index.get("version", 1)
    if versions and versions[-1].get("version") != version:
        found.add(
            "shards",
            shards / VERSIONS,
            f"versions.json ends at {versions[-1].get('version')}, index.json is version {version}",
            repair,
        )
    if not (shards / SAMPLES).exists():
        found.add("shards", shards / SAMPLES, "samples.parquet is missing (written before versions?)", repair)
        return
    samples = read_parquet(shards / SAMPLES, repair)
    keys = samples["key"].to_pylist()
    found.checked["shard samples"] += len(keys)
    if len(set(keys)) != len(keys):
        found.add("shards", shards / SAMPLES, "samples.parquet lists a sample twice", repair)
    if len(keys) != index["total"]:
        found.add(
            "shards", shards / SAMPLES, f"samples.parquet has {len(keys)} samples, index.json {index['total']}", repair
        )
    per_shard = Counter(samples["shard"].to_pylist())
    for i, entry in enumerate(index["shardlist"]):
        path = shards / entry["url"]
        found.checked["shard tars"] += 1
        if not path.exists():
            found.add("shards", path, f"{entry['url']} (named by index.json) is missing", repair)
            continue
        if "filesize" in entry and path.stat().st_size != entry["filesize"]:
            found.add(
                "shards",
                path,
                f"{entry['url']} is {path.stat().st_size} bytes, index.json says {entry['filesize']}",
                repair,
            )
        if per_shard.get(i, 0) != entry["nsamples"]:
            found.add(
                "shards",
                path,
                f"{entry['url']}: samples.parquet puts {per_shard.get(i, 0)} samples in it, "
                f"index.json {entry['nsamples']}",
                repair,
            )

    if expected:
        have = set(keys)
        if all(have != e for e in expected):
            found.add(
                "shards",
                shards / SAMPLES,
                f"the shards do not hold every kept item once ({len(expected[0] - have)} kept items missing, "
                f"{len(have - expected[0])} samples not kept)",
                f"dcgan-pipeline shard --work {work}",
            )
    if data:
        said: dict[int, set[str]] = {}
        for key, shard in zip(keys, samples["shard"].to_pylist(), strict=True):
            said.setdefault(shard, set()).add(key)
        for i, entry in enumerate(index["shardlist"]):
            if (shards / entry["url"]).exists():
                keys = frozenset(said.get(i, ()))
                read = Read(
                    "shards", shards / entry["url"], entry.get("sha256"), repair, keys, entry.get("keys_sha256")
                )
                found.to_read.append(read)


UNCHECKED = ("staging tars without a checksum", "shard tars without a checksum", "checkpoints without a checksum")


def note_unchecked(findings: Findings) -> None:
    """Files written before checksums were recorded: said once, as notes (not problems)."""
    for what in UNCHECKED:
        n = findings.checked.pop(what, 0)
        if n:
            findings.notes.append(
                f"{n} {what} (written before checksums were recorded): --data cannot check their bytes; "
                "a --refresh of their stage records them"
            )


def summary_lines(findings: Findings, work: Path, data: bool) -> Iterable[str]:
    """One line per problem, then the notes and one closing line."""
    yield from (p.line() for p in findings.problems)
    yield from (f"note: {n}" for n in findings.notes)
    looked = ", ".join(f"{n} {what}" for what, n in findings.checked.items() if n)
    state = "whole" if not findings.problems else f"NOT whole: {len(findings.problems)} problems"
    yield f"{work}: {state} ({looked}{'' if data else '; checksums not read: add --data'})"
