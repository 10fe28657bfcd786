"""The dedup stage over a work directory, as separate file-producing steps.

1. `collect_crops`: every kept (status ok) extracted item of every source as a 32x32 crop
   (`dedup/crops32.npy`, `dedup/items.parquet`): decoded once, reused by the steps below.
2. `prepare_autoencoder`: train on the crops (`dedup/autoencoder.pt`: weights + config + history),
   or check the user's trained file.
3. `encode_items`: the 128-bit codes (`dedup/hashes.parquet`).
4. `group_items`: groups and keep flags for a radius (`dedup/codes.parquet`), plus the report.
Changing the radius reruns step 4 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dedup.autoencoder import (
    AEConfig,
    AutoencoderError,
    encode_bits,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from dedup.grouping import choose_keepers, group_codes
from dedup.settings import DedupSettings
from preprocessing.atomic import atomic_write_with
from preprocessing.errors import UserError
from preprocessing.images import SAMPLE_EXT, decode_ppm
from preprocessing.manifest import write_table
from preprocessing.markdown import table
from preprocessing.preview import tile
from preprocessing.sharding import extracted_sources
from preprocessing.stamps import stamp
from preprocessing.tar_shards import index_tar, read_member

log = logging.getLogger(__name__)

CODES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("code", pa.binary(16)),
        ("group", pa.int64()),
        ("keep", pa.bool_()),
        ("degenerate", pa.bool_()),
    ]
)


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


def collect_crops(work: Path) -> int:
    """Write crops32.npy + items.parquet for every ok item of every extracted source."""
    sources = extracted_sources(work)
    if not sources:
        raise DedupError(f"no extracted data under {Path(work) / 'extract'}: run an extraction stage first")
    out = dedup_dir(work)
    inputs = stamp([src / "manifest.parquet" for src in sources])
    if _recorded(out / "items.parquet") == inputs and (out / "crops32.npy").exists():
        log.info("dedup: crops are up to date")
        return pq.read_metadata(out / "items.parquet").num_rows
    keys, srcs, pixels, crops = [], [], [], []
    for src in sources:
        manifest = pq.read_table(src / "manifest.parquet", columns=["key", "status", "width", "height"])
        ok = manifest.filter(pc.equal(manifest["status"], "ok")).to_pylist()
        wanted = {r["key"]: r for r in ok}
        found = 0
        for tar in sorted(src.glob("part-*.tar")):
            with open(tar, "rb") as fh:
                for m in index_tar(tar):
                    if m.ext == SAMPLE_EXT and m.key in wanted:
                        crops.append(to_crop32(decode_ppm(read_member(fh, m))))
                        row = wanted[m.key]
                        keys.append(m.key)
                        srcs.append(src.name)
                        pixels.append((row["width"] or 0) * (row["height"] or 0))
                        found += 1
        if found != len(wanted):
            raise DedupError(f"{src}: {len(wanted) - found} kept items are missing from the staging shards")
        log.info("dedup: collected %d items of %s", found, src.name)
    out.mkdir(parents=True, exist_ok=True)
    array = np.stack(crops) if crops else np.zeros((0, 32, 32, 3), np.uint8)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a path
            np.save(fh, array)

    atomic_write_with(out / "crops32.npy", save)
    items = pa.table({"key": keys, "source": srcs, "pixels": pa.array(pixels, pa.int64())})
    write_table(_record(items, inputs), out / "items.parquet")
    return len(keys)


def _record(table: pa.Table, inputs: str, **extra: str) -> pa.Table:
    """Attach the stamp of the inputs a file was made from to its Parquet metadata."""
    return table.replace_schema_metadata({"inputs": inputs, **extra})


def _recorded(path: Path) -> str | None:
    if not path.exists():
        return None
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"inputs", b"").decode() or None


def load_crops(work: Path) -> np.ndarray:
    return np.load(dedup_dir(work) / "crops32.npy", mmap_mode="r")


def autoencoder_config(settings: DedupSettings) -> AEConfig:
    """The training config of the hash for these settings (`auto` picks CUDA when this machine has it)."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return AEConfig(device=device, max_epochs=settings.max_epochs, seed=settings.seed)


def prepare_autoencoder(work: Path, settings: DedupSettings) -> tuple[Path, dict | None]:
    """The hash to encode with: the user's trained file (checked), or one trained on these crops.

    Training is skipped when autoencoder.pt was already trained on these crops with this config.
    Returns (checkpoint, training info or None for a given file).
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
    trained_on = stamp([dedup_dir(work) / "crops32.npy"])
    if path.exists():
        try:
            _, ckpt = load_autoencoder(path)
        except AutoencoderError:
            ckpt = {}
        if ckpt.get("info", {}).get("trained_on") == trained_on and ckpt.get("config") == asdict(cfg):
            log.info("dedup: autoencoder is up to date")
            return path, ckpt["info"]
    model, info = train_autoencoder(np.asarray(crops), cfg)
    info["trained_on"] = trained_on
    save_autoencoder(model, cfg, info, path)
    return path, info


def encode_items(work: Path, checkpoint: Path | None = None) -> float:
    """Hash every collected item (unless up to date); returns items/s of the encoding itself."""
    checkpoint = checkpoint or dedup_dir(work) / "autoencoder.pt"
    model, _ = load_autoencoder(checkpoint)
    inputs = stamp([checkpoint, dedup_dir(work) / "crops32.npy"])
    out = dedup_dir(work) / "hashes.parquet"
    if _recorded(out) == inputs:
        log.info("dedup: codes are up to date")
        return float(pq.read_schema(out).metadata[b"items_per_s"])
    crops = np.asarray(load_crops(work))
    t0 = time.perf_counter()
    codes = encode_bits(model, crops)
    rate = len(crops) / max(time.perf_counter() - t0, 1e-9)
    items = pq.read_table(dedup_dir(work) / "items.parquet")
    content = [hashlib.sha1(c.tobytes()).digest() for c in crops]
    table = items.append_column("code", pa.array([c.tobytes() for c in codes], pa.binary(16)))
    table = table.append_column("content", pa.array(content, pa.binary(20)))
    write_table(_record(table, inputs, items_per_s=str(rate)), out)
    return rate


def group_items(work: Path, settings: DedupSettings) -> dict:
    """Group, choose keepers ((largest source image, source, key) wins), write codes.parquet and the report."""
    hashes = pq.read_table(dedup_dir(work) / "hashes.parquet")
    n = hashes.num_rows
    codes = (
        np.frombuffer(hashes["code"].combine_chunks().buffers()[1], np.uint8, count=16 * n).reshape(n, 16)
        if n
        else np.zeros((0, 16), np.uint8)
    )
    keys, sources = hashes["key"].to_pylist(), hashes["source"].to_pylist()
    radius = settings.radius
    grouping = group_codes(codes, radius, content=hashes["content"].to_pylist())
    rank = [(-p, s, k) for p, s, k in zip(hashes["pixels"].to_pylist(), sources, keys, strict=True)]
    keep = choose_keepers(grouping.group, rank)
    table = pa.table(
        {
            "key": keys,
            "source": sources,
            "code": hashes["code"],
            "group": grouping.group,
            "keep": keep,
            "degenerate": grouping.degenerate,
        },
        schema=CODES_SCHEMA,
    )
    write_table(table, dedup_dir(work) / "codes.parquet")
    summary = _write_report(work, table, radius, grouping.candidate_pairs)
    log.info("dedup: %d items, %d groups, %d removed at radius %d", n, summary["groups"], summary["removed"], radius)
    return summary


def _write_report(work: Path, codes: pa.Table, radius: int, pairs: int) -> dict:
    out = dedup_dir(work)
    group = codes["group"].to_numpy()
    ids, inverse, sizes = (
        np.unique(group, return_inverse=True, return_counts=True)
        if len(group)
        else (np.zeros(0), np.zeros(0, int), np.zeros(0, int))
    )
    n, removed = len(group), int(len(group) - len(ids))
    degenerate = int(codes["degenerate"].to_numpy(zero_copy_only=False).sum()) if n else 0
    hist = {}
    for s in sizes.tolist():
        label = str(s) if s < 5 else "5-9" if s < 10 else "10-99" if s < 100 else "100+"
        hist[label] = hist.get(label, 0) + 1
    summary = {
        "items": n,
        "groups": int(len(ids)),
        "removed": removed,
        "radius": radius,
        "degenerate": degenerate,
        "candidate_pairs": pairs,
        "largest_group": int(sizes.max()) if n else 0,
        "size_histogram": hist,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    order = sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))
    lines = [
        "# Near-duplicate removal\n",
        table(
            [
                ("items hashed", n),
                ("groups", len(ids)),
                ("removed (not kept)", removed),
                ("Hamming radius", radius),
                ("candidate pairs compared", pairs),
                ("degenerate codes (no active bit; grouped only by identical pixels)", degenerate),
            ],
            ("", "value"),
        ),
        "## Group sizes\n",
        table(order, ("members", "groups")),
    ]
    if degenerate:
        lines.append(
            f"\n**Warning:** {degenerate} items have an all-zero code (flat or black images); they were "
            "not merged with each other unless their pixels are identical. Inspect them."
        )
    sheet = _contact_sheet(work, inverse, sizes, codes["keep"].to_numpy(zero_copy_only=False))
    if sheet is not None:
        cv2.imwrite(str(out / "collisions.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        lines.append(
            "\nEach row of `collisions.png` is one collision group (keeper first): the largest groups, "
            "then random ones. Estimate precision by eye, as the paper did.\n\n![collisions](collisions.png)"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def _contact_sheet(work: Path, inverse: np.ndarray, sizes: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """Rows of up to 12 members: the 8 largest collision groups, then 8 random others."""
    multi = np.flatnonzero(sizes > 1)
    if not len(multi):
        return None
    largest = multi[np.argsort(-sizes[multi], kind="stable")[:8]]
    rest = np.setdiff1d(multi, largest)
    rng = np.random.default_rng(0)
    chosen = list(largest) + list(rng.choice(rest, size=min(8, len(rest)), replace=False))
    crops = load_crops(work)
    rows = []
    for g in chosen:
        members = sorted(np.flatnonzero(inverse == g), key=lambda i: not keep[i])[:12]
        row = [np.asarray(crops[i]) for i in members]
        row += [np.full((32, 32, 3), 255, np.uint8)] * (12 - len(row))
        rows.extend(row)
    return tile(rows, columns=12)
