"""The dedup stage over a work directory, as separate file-producing steps.

1. `collect_crops`: every kept (status ok) extracted item of every source as a 32x32 crop
   (`dedup/crops32.npy`, `dedup/items.parquet`): decoded once, reused by the steps below.
2. `prepare_autoencoder`: train on the crops (`dedup/autoencoder.pt`: weights + config + history),
   or check the user's trained file.
3. `encode_items`: the 128-bit codes (`dedup/hashes.parquet`) and the 16x16 verification
   thumbnails (`dedup/thumbs16.npy`), streaming the memory-mapped crops block by block.
4. `group_items`: candidates from the hash, verified on the thumbnails (dedup.grouping), groups
   and keep flags (`dedup/codes.parquet`), plus the report.
Changing the grouping settings (radius, threshold) reruns step 4 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dedup.autoencoder import (
    AEConfig,
    AutoencoderError,
    encode_bits,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from dedup.contrast import CONTRAST_FLOOR, THUMB, ThumbStats, thumbnails
from dedup.grouping import Grouping, choose_keepers, group_near_duplicates, keeper_rank
from dedup.settings import DedupSettings
from dedup.verify import verify_pairs
from preprocessing.atomic import atomic_write_with
from preprocessing.errors import UserError
from preprocessing.extraction import part_stem, refresh_hint
from preprocessing.images import SAMPLE_EXT, decode_ppm
from preprocessing.manifest import write_table
from preprocessing.markdown import table
from preprocessing.preview import tile
from preprocessing.sharding import DEDUP_REPAIR, extracted_sources
from preprocessing.stamps import stamp
from preprocessing.state import DamagedStateError, load_npy, read_parquet, read_parquet_metadata
from preprocessing.tar_shards import index_tar, read_member

log = logging.getLogger(__name__)

BLOCK = 65536  # crops per block when streaming the memory-mapped crops (200 MB)

ITEMS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("pixels", pa.int64()), ("tar", pa.string())])

CODES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("code", pa.binary(16)),
        ("group", pa.int64()),
        ("keep", pa.bool_()),
        ("low_content", pa.bool_()),
        ("similarity", pa.float32()),
    ]
)
CODES_FORMAT = "dcgan-pipeline-dedup-codes/2"  # /1 (no format key): raw-crop hash, code-only grouping
HASHES_FORMAT = "dcgan-pipeline-dedup-hashes/2"


class DedupError(UserError):
    """A user-facing problem with the dedup inputs."""


def dedup_dir(work: Path) -> Path:
    return Path(work) / "dedup"


def to_crop32(rgb: np.ndarray) -> np.ndarray:
    """The paper's input: a 32x32 center crop (our stored crops are already square)."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    sq = rgb[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return sq if side == 32 else cv2.resize(sq, (32, 32), interpolation=cv2.INTER_AREA)


def collect_crops(work: Path, *, full: bool = False) -> int:
    """Write crops32.npy + items.parquet for every ok item of every extracted source.

    Items collected before, from staging tars that did not change since, keep their rows and
    crops; only new items are decoded and appended. Anything else (a tar rewritten by a
    refreshed extraction, an item that went away), or `full`, collects everything again.
    """
    sources = extracted_sources(work)
    if not sources:
        raise DedupError(f"no extracted data under {Path(work) / 'extract'}: run an extraction stage first")
    out = dedup_dir(work)
    inputs = stamp([src / "manifest.parquet" for src in sources])
    if not full and _recorded(out / "items.parquet") == inputs and (out / "crops32.npy").exists():
        log.info("dedup: crops are up to date")
        return read_parquet_metadata(out / "items.parquet", repair(work, "items.parquet")).num_rows
    wanted: dict[tuple[str, str], dict] = {}
    for src in sources:
        columns = ["key", "status", "width", "height", "part"]
        manifest = read_parquet(src / "manifest.parquet", refresh_hint(src), columns=columns)
        for r in manifest.filter(pc.equal(manifest["status"], "ok")).to_pylist():
            wanted[(src.name, r["key"])] = r
    old = None if full else _reusable_items(work, wanted)
    done = set(zip(old["source"].to_pylist(), old["key"].to_pylist(), strict=True)) if old is not None else set()
    todo = [(s, r["part"]) for (s, k), r in wanted.items() if (s, k) not in done]
    todo_parts, todo_per_source = set(todo), Counter(s for s, _ in todo)
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    reused = old.num_rows if old is not None else 0
    total = reused + len(todo)

    def write(tmp: Path) -> None:
        """Crops straight into a memory-mapped .npy: the old rows block by block, then each new crop as decoded."""
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, 32, 32, 3))
        if reused:
            previous = load_crops(work)
            for s in range(0, reused, BLOCK):
                array[s : min(s + BLOCK, reused)] = previous[s : min(s + BLOCK, reused)]
        at = reused
        for src in sources:
            found = 0
            parts = sorted(p for s, p in todo_parts if s == src.name)
            for tar in [src / f"{part_stem(p)}.tar" for p in parts]:  # only the parts that hold new items
                with open(tar, "rb") as fh:
                    for m in index_tar(tar):
                        ident = (src.name, m.key)
                        if m.ext != SAMPLE_EXT or ident not in wanted or ident in done:
                            continue
                        if at >= total:
                            raise DedupError(f"{tar}: more kept items than the manifests list; re-extract")
                        array[at] = to_crop32(decode_ppm(read_member(fh, m)))
                        at += 1
                        r = wanted[ident]
                        rows.append(
                            {
                                "key": m.key,
                                "source": src.name,
                                "pixels": (r["width"] or 0) * (r["height"] or 0),
                                "tar": f"{src.name}/{tar.name}",
                            }
                        )
                        found += 1
            missing = todo_per_source[src.name] - found
            if missing:
                raise DedupError(f"{src}: {missing} kept items are missing from the staging shards")
            log.info("dedup: collected %d new items of %s", found, src.name)
        array.flush()
        del array

    atomic_write_with(out / "crops32.npy", write)
    added = pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)
    items = pa.concat_tables([old.select(ITEMS_SCHEMA.names).cast(ITEMS_SCHEMA), added]) if old is not None else added
    tars = sorted(set(items["tar"].to_pylist()))
    tar_stamps = json.dumps({t: stamp([Path(work) / "extract" / t]) for t in tars}, sort_keys=True)
    write_table(
        _record(items, inputs, tars=tar_stamps, reused=str(old.num_rows if old is not None else 0)),
        out / "items.parquet",
    )
    return items.num_rows


def _reusable_items(work: Path, wanted: dict[tuple[str, str], dict]) -> pa.Table | None:
    """The items collected before when every one is still wanted and its staging tar is unchanged, else None."""
    path = dedup_dir(work) / "items.parquet"
    if not path.exists() or not (dedup_dir(work) / "crops32.npy").exists():
        return None
    items = read_parquet(path, repair(work, path.name))
    meta = items.schema.metadata or {}
    if "tar" not in items.column_names or b"tars" not in meta:
        return None  # collected by an older version: collect again
    recorded = json.loads(meta[b"tars"])
    if any(stamp([Path(work) / "extract" / t]) != st for t, st in recorded.items()):
        return None
    idents = zip(items["source"].to_pylist(), items["key"].to_pylist(), strict=True)
    if not all(i in wanted for i in idents) or len(load_crops(work)) != items.num_rows:
        return None
    return items


def _record(table: pa.Table, inputs: str, **extra: str) -> pa.Table:
    """Attach the stamp of the inputs a file was made from to its Parquet metadata."""
    return table.replace_schema_metadata({"inputs": inputs, **extra})


def _recorded(path: Path, key: str = "inputs") -> str | None:
    """A value this stage recorded in a Parquet file's metadata (None when the file or the key is missing)."""
    if not path.exists():
        return None
    meta = read_parquet_metadata(path, repair(path.parents[1], path.name)).schema.to_arrow_schema().metadata or {}
    return meta.get(key.encode(), b"").decode() or None


DERIVED = ("items.parquet", "crops32.npy", "hashes.parquet", "thumbs16.npy")  # rebuilt from the extraction


def repair(work: Path, name: str) -> str:
    """How to repair a damaged dedup file: derived ones are rebuilt; the hash and the groups only by a full re-dedup."""
    if name in DERIVED:
        return (
            f"delete it and rerun dcgan-pipeline dedup --work {work} (it is rebuilt from the extraction; "
            "the keep flags of codes.parquet stay)"
        )
    return DEDUP_REPAIR.format(work=work)


def clear_for_refresh(work: Path) -> None:
    """A full re-dedup starts from the extraction: the derived files and groups go first (damaged or not)."""
    for name in (*DERIVED, "codes.parquet"):
        (dedup_dir(work) / name).unlink(missing_ok=True)


def load_crops(work: Path) -> np.ndarray:
    return load_npy(dedup_dir(work) / "crops32.npy", repair(work, "crops32.npy"))


def autoencoder_config(settings: DedupSettings) -> AEConfig:
    """The training config of the hash for these settings (`auto` picks CUDA when this machine has it)."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return AEConfig(device=device, max_epochs=settings.max_epochs, seed=settings.seed)


def prepare_autoencoder(work: Path, settings: DedupSettings, *, retrain: bool = False) -> tuple[Path, dict | None]:
    """The hash to encode with: the user's trained file (checked), or the work directory's own.

    The work directory's hash is trained once, on the items collected then, and reused as the
    data grows, so the codes of items kept before never change; it is trained again only with
    `retrain` (the stage's refresh, or settings.retrain_autoencoder) or when its config
    changed. Returns (checkpoint, training info or None for a given file).
    """
    if settings.autoencoder is not None:
        path = Path(settings.autoencoder)
        load_autoencoder(path)  # a clear AutoencoderError for a file that is not this autoencoder
        return path, None
    crops = load_crops(work)
    if len(crops) == 0:
        raise DedupError(f"no kept items under {Path(work) / 'extract'} to deduplicate")
    cfg = autoencoder_config(settings)
    path = dedup_dir(work) / "autoencoder.pt"
    if path.exists() and not (retrain or settings.retrain_autoencoder):
        try:
            _, ckpt = load_autoencoder(path)
        except AutoencoderError as exc:
            if (dedup_dir(work) / "codes.parquet").exists():  # a new hash would silently regroup every kept item
                raise DamagedStateError(f"{exc} -> {repair(work, path.name)}") from None
            ckpt = {}
        if ckpt.get("config") == asdict(cfg):
            log.info("dedup: reusing the trained autoencoder (trained on %s items)", ckpt["info"].get("items", "?"))
            return path, ckpt["info"]
    model, info = train_autoencoder(crops, cfg)  # a random subset of max_items is read
    info["items"] = len(crops)
    save_autoencoder(model, cfg, info, path)
    return path, info


def load_thumbs(work: Path) -> np.ndarray:
    return load_npy(dedup_dir(work) / "thumbs16.npy", repair(work, "thumbs16.npy"))


def encode_items(work: Path, checkpoint: Path | None = None) -> float:
    """Hash the collected items and write their verification thumbnails, streaming the crops block by block.

    Rows hashed before with this autoencoder and the same crop keep their code. Returns items/s
    of the encoding itself (of the items encoded now).
    """
    checkpoint = checkpoint or dedup_dir(work) / "autoencoder.pt"
    model, _ = load_autoencoder(checkpoint)
    out = dedup_dir(work) / "hashes.parquet"
    inputs = stamp([checkpoint, dedup_dir(work) / "crops32.npy"])
    fresh = _recorded(out) == inputs and _recorded(out, "format") == HASHES_FORMAT
    if fresh and (dedup_dir(work) / "thumbs16.npy").exists():
        log.info("dedup: codes are up to date")
        return float(_recorded(out, "items_per_s") or 0.0)
    crops = load_crops(work)
    items = read_parquet(dedup_dir(work) / "items.parquet", repair(work, "items.parquet"))
    content: list[bytes] = []

    def write_thumbs(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(crops), THUMB, THUMB, 3))
        for s in range(0, len(crops), BLOCK):
            block = np.asarray(crops[s : s + BLOCK])
            array[s : s + len(block)] = thumbnails(block)
            content.extend(hashlib.sha1(c.tobytes()).digest() for c in block)
        array.flush()
        del array

    atomic_write_with(dedup_dir(work) / "thumbs16.npy", write_thumbs)
    model_stamp = stamp([checkpoint])
    old = _reusable_prefix(out, model_stamp, items, content)
    keep = len(old)
    t0 = time.perf_counter()
    fresh = encode_bits(model, crops[keep:])  # reads the memory-mapped crops batch by batch
    rate = (len(crops) - keep) / max(time.perf_counter() - t0, 1e-9)
    codes = old + [c.tobytes() for c in fresh]
    table = items.append_column("code", pa.array(codes, pa.binary(16)))
    table = table.append_column("content", pa.array(content, pa.binary(20)))
    write_table(_record(table, inputs, items_per_s=str(rate), model=model_stamp, format=HASHES_FORMAT), out)
    log.info("dedup: %d codes reused, %d encoded", keep, len(crops) - keep)
    return rate


def _reusable_prefix(hashes: Path, model: str, items: pa.Table, content: list[bytes]) -> list[bytes]:
    """The codes of the leading rows of `hashes` that are the same items with the same crops, by the same model."""
    if _recorded(hashes, "model") != model:
        return []
    old = read_parquet(hashes, repair(hashes.parents[1], hashes.name), columns=["key", "source", "content", "code"])
    n = min(old.num_rows, items.num_rows)
    same = (np.array(old["key"].to_pylist()[:n]) == np.array(items["key"].to_pylist()[:n])) & (
        np.array(old["source"].to_pylist()[:n]) == np.array(items["source"].to_pylist()[:n])
    )
    same &= np.array([a == b for a, b in zip(old["content"].to_pylist()[:n], content[:n], strict=True)], bool)
    keep = n if same.all() else int(np.argmin(same))
    return old["code"].to_pylist()[:keep]


def grouping_settings(settings: DedupSettings) -> str:
    """The settings a grouping depends on, as recorded in codes.parquet: same string, same groups."""
    fields = ("radius", "min_similarity", "low_content_rms", "bucket_cap")
    return json.dumps({f: getattr(settings, f) for f in fields}, sort_keys=True)


def group_items(work: Path, settings: DedupSettings, *, full: bool = False) -> dict:
    """Group, choose keepers ((largest source image, source, key) wins), write codes.parquet and the report.

    When codes.parquet already grouped the leading items (same items, same codes, same grouping
    settings, this version's format), those rows stay as they are (no churn: what shards were
    cut from stays valid) and only the new items are grouped, against the items kept before and
    among themselves: a new item that duplicates a kept one is not kept. `full` regroups
    everything; so does a codes.parquet written by an older version (logged, and said in the report).
    """
    hashes = read_parquet(dedup_dir(work) / "hashes.parquet", repair(work, "hashes.parquet"))
    if _recorded(dedup_dir(work) / "hashes.parquet", "format") != HASHES_FORMAT:
        raise DedupError(f"{dedup_dir(work) / 'hashes.parquet'} was written by an older version: rerun the dedup stage")
    n = hashes.num_rows
    codes = (
        np.frombuffer(hashes["code"].combine_chunks().buffers()[1], np.uint8, count=16 * n).reshape(n, 16)
        if n
        else np.zeros((0, 16), np.uint8)
    )
    thumbs = load_thumbs(work)
    if len(thumbs) != n:
        path = dedup_dir(work) / "thumbs16.npy"
        raise DedupError(f"{path} holds {len(thumbs)} items, not {n}: rerun the dedup stage")
    keys, sources = hashes["key"].to_pylist(), hashes["source"].to_pylist()
    content = hashes["content"].to_pylist()
    rank = keeper_rank(hashes["pixels"].to_pylist(), sources, keys)
    stats = ThumbStats.of(thumbs)
    prev, migrated = (None, False) if full else _grouped_prefix(work, hashes, settings)
    if prev is None:
        g = group_near_duplicates(
            codes,
            thumbs,
            radius=settings.radius,
            rule=settings.rule(),
            content=content,
            cap=settings.bucket_cap,
            stats=stats,
            rank=rank,
        )
        group, keep, low, growth = g.group, choose_keepers(g.group, rank), g.low_content, None
    else:
        group, keep, low, g, growth = _group_new(prev, codes, thumbs, stats, content, rank, settings)
    similarity = _keeper_similarity(thumbs, stats, group, keep, settings)
    table = pa.table(
        {
            "key": keys,
            "source": sources,
            "code": hashes["code"],
            "group": group,
            "keep": keep,
            "low_content": low,
            "similarity": similarity,
        },
        schema=CODES_SCHEMA,
    ).replace_schema_metadata({"format": CODES_FORMAT, "grouping": grouping_settings(settings)})
    write_table(table, dedup_dir(work) / "codes.parquet")
    summary = _write_report(work, table, settings, g, growth, migrated)
    log.info(
        "dedup: %d items, %d groups, %d removed (radius %d: %d candidate pairs, %d verified, %d rejected)",
        n,
        summary["groups"],
        summary["removed"],
        settings.radius,
        g.candidate_pairs,
        g.verified_pairs,
        g.rejected_pairs,
    )
    return summary


def _keeper_similarity(
    thumbs: np.ndarray, stats: ThumbStats, group: np.ndarray, keep: np.ndarray, settings: DedupSettings
) -> np.ndarray:
    """Each item's thumbnail correlation with its group's keeper (1 for keepers and items alone)."""
    similarity = np.ones(len(group), np.float32)
    keeper_of = np.full(len(group), -1, np.int64)
    kept = np.flatnonzero(keep)
    keeper_of[group[kept]] = kept
    removed = np.flatnonzero(~keep)
    if len(removed):
        similarity[removed] = verify_pairs(
            thumbs, stats, removed, keeper_of[group[removed]], settings.rule()
        ).similarity
    return similarity


def _grouped_prefix(work: Path, hashes: pa.Table, settings: DedupSettings) -> tuple[pa.Table | None, bool]:
    """(The earlier codes.parquet when it grouped exactly the leading rows of `hashes` alike, whether it was older)."""
    path = dedup_dir(work) / "codes.parquet"
    if not path.exists():
        return None, False
    if _recorded(path, "format") != CODES_FORMAT:
        log.warning("dedup: %s was written by an older version: regrouping every item", path)
        return None, True
    prev = read_parquet(path, repair(work, path.name))
    meta = prev.schema.metadata or {}
    if meta.get(b"grouping", b"").decode() != grouping_settings(settings) or prev.num_rows > hashes.num_rows:
        return None, False
    head = hashes.slice(0, prev.num_rows)
    for column in ("key", "source", "code"):
        if not prev[column].equals(head[column]):
            return None, False
    return prev, False


def _group_new(
    prev: pa.Table,
    codes: np.ndarray,
    thumbs: np.ndarray,
    stats: ThumbStats,
    content: list[bytes],
    rank: np.ndarray,
    settings: DedupSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Grouping, dict]:
    """Group the rows after `prev` against prev's kept items and among themselves; prev's rows stay."""
    m, n = prev.num_rows, len(codes)
    old_group = prev["group"].to_numpy()
    old_keep = prev["keep"].to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(old_keep)
    cand = np.concatenate([kept, np.arange(m, n)])
    g = group_near_duplicates(
        codes[cand],
        thumbs,
        radius=settings.radius,
        rule=settings.rule(),
        content=[content[i] for i in cand],
        rows=cand,
        cap=settings.bucket_cap,
        stats=stats,
        rank=rank[cand],
        kept=np.arange(len(cand)) < len(kept),
    )
    local = g.group[len(kept) :]  # a group's id is its keeper: below len(kept) means an item kept before keeps it
    of_existing = local < len(kept)
    existing = old_group[kept[np.clip(local, 0, len(kept) - 1)]] if len(kept) else np.zeros_like(local)
    new_group = np.where(of_existing, existing, m + local - len(kept))
    new_keep = np.zeros(n - m, bool)
    alone = np.flatnonzero(~of_existing)
    if len(alone):
        sub_rank = np.argsort(np.argsort(rank[m + alone], kind="stable"), kind="stable")
        new_keep[alone] = choose_keepers(np.unique(new_group[alone], return_inverse=True)[1], sub_rank)
    growth = {
        "new_items": int(n - m),
        "duplicates_of_existing": int(of_existing.sum()),
        "duplicates_among_new": int(len(alone) - new_keep.sum()),
        "existing_groups_hit": sorted(set(new_group[of_existing].tolist())),
    }
    group = np.concatenate([old_group, new_group])
    keep = np.concatenate([old_keep, new_keep])
    low = np.concatenate([prev["low_content"].to_numpy(zero_copy_only=False), g.low_content[len(kept) :]])
    return group, keep, low, g, growth


def _write_report(
    work: Path, codes: pa.Table, settings: DedupSettings, g: Grouping, growth: dict | None, migrated: bool
) -> dict:
    out = dedup_dir(work)
    group = codes["group"].to_numpy()
    ids, inverse, sizes = (
        np.unique(group, return_inverse=True, return_counts=True)
        if len(group)
        else (np.zeros(0), np.zeros(0, int), np.zeros(0, int))
    )
    n, removed = len(group), int(len(group) - len(ids))
    low = int(codes["low_content"].to_numpy(zero_copy_only=False).sum()) if n else 0
    hist = {}
    for s in sizes.tolist():
        label = str(s) if s < 5 else "5-9" if s < 10 else "10-99" if s < 100 else "100+"
        hist[label] = hist.get(label, 0) + 1
    cand = g.candidates
    summary = {
        "items": n,
        "groups": int(len(ids)),
        "removed": removed,
        "radius": settings.radius,
        "min_similarity": settings.min_similarity,
        "low_content": low,
        "identical_pairs": g.identical_pairs,
        "candidate_pairs": g.candidate_pairs,
        "verified_pairs": g.verified_pairs,
        "rejected_pairs": g.rejected_pairs,
        "low_content_pairs": g.low_content_pairs,
        "buckets_split": cand.buckets_split,
        "buckets_windowed": cand.buckets_windowed,
        "largest_group": int(sizes.max()) if n else 0,
        "size_histogram": hist,
        "incremental": growth is not None,
        "migrated": migrated,
        **{k: v for k, v in (growth or {}).items() if k != "existing_groups_hit"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    order = sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))
    scope = "new items against the kept ones" if growth is not None else "all items"
    lines = [
        "# Near-duplicate removal\n",
        "The hash proposes candidate pairs (codes within the Hamming radius); a candidate merges only when "
        f"the 16x16 thumbnails of the two crops correlate >= {settings.min_similarity} (Pearson: brightness "
        f"and contrast do not count). Flat or dark crops (spread under {CONTRAST_FLOOR:g} grey levels) merge "
        f"only when their pixels differ by at most {settings.low_content_rms:g} RMS.\n",
        table(
            [
                ("items hashed", n),
                ("groups", len(ids)),
                ("removed (not kept)", removed),
                ("Hamming radius", settings.radius),
                ("verification: min thumbnail correlation", settings.min_similarity),
                (f"pixel-identical items (merged before hashing; {scope})", g.identical_pairs),
                ("candidate pairs from the hash", g.candidate_pairs),
                ("verified pairs (merged)", g.verified_pairs),
                ("rejected candidates", g.rejected_pairs),
                ("candidates judged by the low-content rule", g.low_content_pairs),
                (f"hash buckets above the cap of {settings.bucket_cap} (split by more bits)", cand.buckets_split),
                ("low-content items (flat or dark)", low),
            ],
            ("", "value"),
        ),
        "## Group sizes\n",
        table(order, ("members", "groups")),
    ]
    if migrated:
        lines.append(
            "\n**Note:** the previous codes.parquet was written by an older version of this stage; every item "
            "was grouped again (kept items may have changed, and the shards follow).\n"
        )
    if growth is not None:
        lines += [
            "\n## This update\n",
            "Items kept before stay kept; new items were grouped against them and among themselves.\n",
            table(
                [
                    ("new items", growth["new_items"]),
                    ("duplicates of existing items (not kept)", growth["duplicates_of_existing"]),
                    ("duplicates among the new items (not kept)", growth["duplicates_among_new"]),
                ],
                ("", "count"),
            ),
        ]
        sheet = _growth_sheet(work, codes, growth)
        (out / "new_vs_existing.png").unlink(missing_ok=True)
        if sheet is not None:
            cv2.imwrite(str(out / "new_vs_existing.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
            lines.append(
                "Each row of `new_vs_existing.png`: an existing kept item, then the new items found to be its "
                "duplicates.\n\n![new vs existing](new_vs_existing.png)"
            )
    similarity = codes["similarity"].to_numpy()
    shown = _shown_groups(inverse, sizes)
    (out / "collisions.png").unlink(missing_ok=True)
    if shown:
        keep = codes["keep"].to_numpy(zero_copy_only=False)
        rows_md = []
        tiles = []
        for k, gid in enumerate(shown):
            members = sorted(np.flatnonzero(inverse == gid), key=lambda i: not keep[i])[:12]
            tiles += _row(work, members)
            sims = ", ".join(f"{similarity[i]:.3f}" for i in members[1:])
            rows_md.append((k + 1, int(sizes[gid]), sims))
        cv2.imwrite(str(out / "collisions.png"), cv2.cvtColor(tile(tiles, columns=12), cv2.COLOR_RGB2BGR))
        lines += [
            "\n## Collision groups\n",
            "Each row of `collisions.png` is one group (keeper first): the largest groups, then random ones. "
            "Estimate precision by eye, as the paper did; beside each row, the thumbnail correlation of each "
            "shown member with the keeper (groups are stars around their keeper: each member was verified "
            "against the keeper itself, so none is below the threshold but flat crops, which merge by pixel "
            "difference).\n",
            table(rows_md, ("row", "members", "correlation with the keeper")),
            "\n![collisions](collisions.png)",
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def _row(work: Path, members: list[int]) -> list[np.ndarray]:
    crops = load_crops(work)
    row = [np.asarray(crops[i]) for i in members]
    return row + [np.full((32, 32, 3), 255, np.uint8)] * (12 - len(row))


def _shown_groups(inverse: np.ndarray, sizes: np.ndarray) -> list[int]:
    """The 8 largest collision groups, then 8 random others (by their index in `sizes`)."""
    multi = np.flatnonzero(sizes > 1)
    if not len(multi):
        return []
    largest = multi[np.argsort(-sizes[multi], kind="stable")[:8]]
    rest = np.setdiff1d(multi, largest)
    rng = np.random.default_rng(0)
    return [int(x) for x in list(largest) + list(rng.choice(rest, size=min(8, len(rest)), replace=False))]


def _growth_sheet(work: Path, codes: pa.Table, growth: dict) -> np.ndarray | None:
    """Rows of up to 12: an existing keeper, then the new items that duplicate it (at most 16 groups)."""
    hit = growth["existing_groups_hit"][:16]
    if not hit:
        return None
    group = codes["group"].to_numpy()
    keep = codes["keep"].to_numpy(zero_copy_only=False)
    first_new = len(group) - growth["new_items"]
    crops = load_crops(work)
    rows = []
    for g in hit:
        members = np.flatnonzero(group == g)
        keeper = [i for i in members if keep[i] and i < first_new]
        row = [np.asarray(crops[i]) for i in (keeper + [i for i in members if i >= first_new])[:12]]
        rows.extend(row + [np.full((32, 32, 3), 255, np.uint8)] * (12 - len(row)))
    return tile(rows, columns=12)
