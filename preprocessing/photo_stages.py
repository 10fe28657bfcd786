"""Stages that turn a photo collection into crops: faces (0..n per photo) and ingest (1 per photo).

Same contracts as LSUN extraction (README, "Work directory"): `work/extract/<source>/` holds
plan.json, inputs.parquet (the photo index), per-part staging tars and manifests written
atomically, and the merged manifest. Manifest rows: one per detection (kept, or rejected as
too small) and one per photo that yields no crop, with the reason. So every input photo is
accounted for, and crops join back to photos through photo_key, photo_path and the box.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocessing.atomic import atomic_write_json
from preprocessing.errors import UserError
from preprocessing.faces import DetectorConfig, FaceDetector, file_sha256, square_crop
from preprocessing.images import SAMPLE_EXT, ImageRejected, center_crop_resize, decode_rgb, encode_ppm
from preprocessing.manifest import SCHEMA, existing_plan, write_table
from preprocessing.parallel import process_pool
from preprocessing.photos import PhotoSource, list_photos, open_source, read_photos
from preprocessing.settings import FacesSettings, IngestSettings
from preprocessing.tar_shards import TarShardWriter

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9_\-]+$")

PHOTO_SCHEMA = pa.schema(
    list(SCHEMA)
    + [
        ("photo_key", pa.string()),
        ("photo_path", pa.string()),
        ("label", pa.string()),
        ("face_index", pa.int32()),
        ("box_x", pa.int32()),
        ("box_y", pa.int32()),
        ("box_w", pa.int32()),
        ("box_h", pa.int32()),
        ("score", pa.float32()),
        ("detector", pa.string()),
    ]
)


class StageError(UserError):
    """A user-facing problem with a photo stage's inputs or settings."""


# A crop function maps one decoded photo to its outcomes: (row fields, crop or None).
CropFn = Callable[[np.ndarray, dict], list[tuple[dict, np.ndarray | None]]]


def prepare_photo_stage(
    photos: str | Path, work: Path, name: str, settings: FacesSettings | IngestSettings
) -> tuple[Path, int]:
    """Index the collection and plan row-range parts; refuse to mix with other settings or inputs."""
    if not _SAFE.match(name):
        raise StageError(f"source name {name!r} may hold only letters, digits, '_' and '-'")
    plan_settings = face_plan(settings) if isinstance(settings, FacesSettings) else ingest_plan(settings)
    part_size = settings.part_size
    src = open_source(photos)
    out_dir = Path(work) / "extract" / name
    full = {**plan_settings, "photos": src.path, "kind": src.kind, "part_size": part_size}
    plan = existing_plan(out_dir, full, StageError)
    if plan is not None:
        return out_dir, int(plan["parts"])
    index = list_photos(src, labels_from_folders=plan_settings.get("labels_from_folders", False))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(index, out_dir / "inputs.parquet")
    parts = (index.num_rows + part_size - 1) // part_size
    atomic_write_json(out_dir / "plan.json", {"settings": full, "parts": parts, "photos": index.num_rows})
    return out_dir, parts


def run_photo_part(out_dir: Path, part: int, crop_fn_factory: Callable[[dict], CropFn]) -> dict:
    """Process one row range of inputs.parquet into `part-NNNNNN.{tar,parquet}` (skip if complete)."""
    stem = f"part-{part:06d}"
    manifest_path = out_dir / f"{stem}.parquet"
    if manifest_path.exists():
        return _summary(part, pq.read_table(manifest_path), 0.0, skipped=True)
    plan = json.loads((out_dir / "plan.json").read_text())
    settings = plan["settings"]
    part_size = settings["part_size"]
    src = PhotoSource(settings["photos"], settings["kind"])
    refs = pq.read_table(out_dir / "inputs.parquet").slice(part * part_size, part_size).to_pylist()
    crop_fn = crop_fn_factory(settings)
    source = out_dir.name
    t0 = time.perf_counter()
    rows: list[dict] = []
    with TarShardWriter(out_dir / f"{stem}.tar") as tar:
        for ref, data, error in read_photos(src, refs):
            base = {
                "source": source,
                "part": part,
                "photo_key": ref["photo_key"],
                "photo_path": ref["photo_path"],
                "label": ref["label"],
                "nbytes": len(data or b""),
            }
            if error is not None:
                rows.append(
                    {**base, "key": ref["photo_key"], "status": "rejected", "reason": "unreadable", "detail": error}
                )
                continue
            try:
                rgb, fmt, (w, h) = decode_rgb(
                    data or b"", max_pixels=settings["max_pixels"], target_short_side=settings.get("decode_short_side")
                )
            except ImageRejected as exc:
                rows.append(
                    {
                        **base,
                        "key": ref["photo_key"],
                        "status": "rejected",
                        "reason": exc.reason,
                        "detail": exc.detail[:200],
                    }
                )
                continue
            base.update(format=fmt, width=w, height=h)
            for fields, crop in crop_fn(rgb, ref):
                row = {**base, **fields}
                rows.append(row)
                if crop is not None:
                    meta = {
                        k: row[k]
                        for k in (
                            "key",
                            "source",
                            "photo_key",
                            "photo_path",
                            "label",
                            "face_index",
                            "box_x",
                            "box_y",
                            "box_w",
                            "box_h",
                            "score",
                            "detector",
                        )
                        if k in row
                    }
                    tar.write(
                        row["key"], {SAMPLE_EXT: encode_ppm(crop), "json": json.dumps(meta, sort_keys=True).encode()}
                    )
    table = pa.Table.from_pylist(rows, schema=PHOTO_SCHEMA)
    write_table(table, manifest_path)
    summary = _summary(part, table, time.perf_counter() - t0, skipped=False)
    log.info(
        "%s part %d: %d photos, %d crops, %.1f photos/s",
        source,
        part,
        summary["photos"],
        summary["ok"],
        summary["photos"] / max(summary["seconds"], 1e-9),
    )
    return summary


def _summary(part: int, table: pa.Table, seconds: float, *, skipped: bool) -> dict:
    status = table["status"].to_pylist()
    reasons = Counter(r for r, s in zip(table["reason"].to_pylist(), status, strict=True) if s != "ok")
    return {
        "part": part,
        "rows": table.num_rows,
        "photos": len(pc.unique(table["photo_key"])),
        "ok": status.count("ok"),
        "rejected": dict(reasons),
        "seconds": seconds,
        "skipped": skipped,
    }


def merge_photo_manifests(out_dir: Path) -> pa.Table:
    """Concatenate part manifests; verify every indexed photo is accounted for exactly once."""
    plan = json.loads((out_dir / "plan.json").read_text())
    paths = [out_dir / f"part-{i:06d}.parquet" for i in range(plan["parts"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise StageError(f"{out_dir}: {len(missing)} parts incomplete, e.g. {missing[:3]}")
    table = pa.concat_tables([pq.read_table(p, schema=PHOTO_SCHEMA) for p in paths])
    inputs = pq.read_table(out_dir / "inputs.parquet", columns=["photo_key"])
    seen = set(table["photo_key"].to_pylist())
    if seen != set(inputs["photo_key"].to_pylist()):
        raise StageError(f"{out_dir}: manifest does not account for every input photo")
    if len(pc.unique(table["key"])) != table.num_rows:
        raise StageError(f"{out_dir}: duplicate keys in the manifest")
    write_table(table, out_dir / "manifest.parquet")
    return table


# -- faces ---------------------------------------------------------------------------------


def face_plan(settings: FacesSettings) -> dict:
    """The plan's record of the faces settings (the detector file by path and sha256)."""
    detector = DetectorConfig(kind=settings.detector, model=settings.model, min_face=settings.min_face)
    FaceDetector(detector)  # loads the cascade or ONNX file: a broken model fails before anything is written
    det = asdict(detector)
    if detector.model:
        det["model"] = str(Path(detector.model).resolve())
        det["model_sha256"] = file_sha256(detector.model)
    return {
        "stage": "faces",
        "size": settings.size,
        "margin": settings.margin,
        "max_pixels": settings.max_pixels,
        "detector": det,
    }


_DETECTORS: dict[str, FaceDetector] = {}


def face_crops(settings: dict) -> CropFn:
    """Crop function for the faces stage; the detector is built once per process."""
    det = {k: v for k, v in settings["detector"].items() if k != "model_sha256"}
    cache_key = json.dumps(det, sort_keys=True)
    if cache_key not in _DETECTORS:
        _DETECTORS[cache_key] = FaceDetector(DetectorConfig(**det))
    detector = _DETECTORS[cache_key]
    size, margin, min_face = settings["size"], settings["margin"], detector.cfg.min_face

    def crop(rgb: np.ndarray, ref: dict) -> list[tuple[dict, np.ndarray | None]]:
        if min(rgb.shape[:2]) < min_face:
            reason = {
                "key": ref["photo_key"],
                "status": "rejected",
                "reason": "too_small",
                "detail": f"{rgb.shape[1]}x{rgb.shape[0]} photo cannot hold a {min_face} px face",
            }
            return [(reason, None)]
        faces = detector.detect(rgb)
        if not faces:
            return [({"key": ref["photo_key"], "status": "rejected", "reason": "no_face"}, None)]
        out = []
        for i, f in enumerate(faces):
            fields = {
                "key": f"{ref['photo_key']}_{i}",
                "face_index": i,
                "box_x": f.x,
                "box_y": f.y,
                "box_w": f.w,
                "box_h": f.h,
                "score": f.score,
                "detector": detector.cfg.kind,
            }
            if min(f.w, f.h) < min_face:
                fields.update(
                    status="rejected", reason="face_too_small", detail=f"box {f.w}x{f.h} < min_face {min_face}"
                )
                out.append((fields, None))
            else:
                out.append(({**fields, "status": "ok"}, square_crop(rgb, f, size, margin)))
        return out

    return crop


# -- ImageNet-style ingestion ----------------------------------------------------------------


def ingest_plan(settings: IngestSettings) -> dict:
    return {
        "stage": "ingest",
        "size": settings.size,
        "max_pixels": settings.max_pixels,
        "decode_short_side": settings.size,
        "labels_from_folders": True,
    }


def ingest_crops(settings: dict) -> CropFn:
    """Crop function for ingestion: min-resize + center crop, one per photo."""
    size = settings["size"]

    def crop(rgb: np.ndarray, ref: dict) -> list[tuple[dict, np.ndarray | None]]:
        return [({"key": ref["photo_key"], "status": "ok"}, center_crop_resize(rgb, size))]

    return crop


STAGES: dict[str, Callable[[dict], CropFn]] = {"faces": face_crops, "ingest": ingest_crops}


def run_photo_stage(
    photos: str | Path, work: Path, name: str, settings: FacesSettings | IngestSettings, *, workers: int | None = None
) -> pa.Table:
    """Plan, process every part on a process pool, merge (the Prefect-free driver)."""
    out_dir, parts = prepare_photo_stage(photos, work, name, settings)
    stage = "faces" if isinstance(settings, FacesSettings) else "ingest"
    job = partial(run_photo_part, out_dir, crop_fn_factory=STAGES[stage])
    workers = workers or os.cpu_count() or 1
    if workers == 1 or parts == 1:
        for i in range(parts):
            job(i)
    else:
        with process_pool(workers) as pool:
            for done, _ in enumerate(pool.map(job, range(parts)), 1):
                log.info("%s: %d/%d parts", name, done, parts)
    return merge_photo_manifests(out_dir)
