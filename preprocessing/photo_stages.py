"""Stages that turn a photo collection into crops: faces (0..n per photo) and ingest (1 per photo).

A photo collection is one kind of source of the extraction engine (`preprocessing.extraction`),
as an LSUN LMDB is, so planning, incremental reruns, parts and merging are shared:
`work/extract/<source>/` holds plan.json, inputs.parquet (the photo index with each photo's
part), per-part staging tars and manifests written atomically, and the merged manifest.
Manifest rows: one per detection (kept, or rejected as too small) and one per photo that
yields no crop, with the reason. So every input photo is accounted for, and crops join back to
photos through photo_key, photo_path and the box.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.errors import UserError
from preprocessing.extraction import (
    ExtractionPlan,
    merge_manifests,
    plan_extraction,
    refresh_hint,
    run_part,
    run_parts,
)
from preprocessing.faces import DetectorConfig, FaceDetector, file_sha256, square_crop
from preprocessing.images import SAMPLE_EXT, ImageRejected, center_crop_resize, decode_rgb, encode_ppm
from preprocessing.manifest import SCHEMA
from preprocessing.parallel import process_pool
from preprocessing.photos import INPUT_SCHEMA, PhotoSource, list_photos, open_source, read_photos, source_fingerprint
from preprocessing.settings import FacesSettings, IngestSettings
from preprocessing.state import read_json

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


@dataclass(frozen=True)
class PhotoKind:
    """A folder, tar or table of photos as a source kind; `stage` picks the crop function."""

    src: PhotoSource
    settings: dict  # the plan's settings (plain values, so a part needs no settings model)
    stage: str
    source: str

    identity: ClassVar[str] = "photo_key"
    display: ClassVar[str] = "photo_path"
    index_schema: ClassVar[pa.Schema] = INPUT_SCHEMA
    manifest_schema: ClassVar[pa.Schema] = PHOTO_SCHEMA
    error: ClassVar[type[UserError]] = StageError

    @property
    def name(self) -> str:
        return self.src.kind

    def source_fingerprint(self) -> str | None:
        return source_fingerprint(self.src)

    def list_inputs(self) -> pa.Table:
        return list_photos(self.src, labels_from_folders=self.settings.get("labels_from_folders", False))

    def legacy_index(self, out_dir: Path, plan: dict, listing: pa.Table) -> tuple[pa.Table, int]:
        """Format 1 kept the index without parts: part i held rows [i * part_size, (i + 1) * part_size)."""
        index = pq.read_table(out_dir / "inputs.parquet", schema=INPUT_SCHEMA)
        n, part_size = index.num_rows, self.settings["part_size"]
        index = index.append_column("fingerprint", pa.nulls(n, pa.string()))
        index = index.append_column("part", pa.array([i // part_size for i in range(n)], pa.int32()))
        return index.append_column("gone", pa.repeat(pa.scalar(False), n)), int(plan["parts"])

    def process(self, part: int, refs: list[dict]) -> Iterator[tuple[dict, dict[str, bytes] | None]]:
        settings = self.settings
        crop_fn = STAGES[self.stage](settings)
        for ref, data, error in read_photos(self.src, refs):
            base = {
                "source": self.source,
                "part": part,
                "photo_key": ref["photo_key"],
                "photo_path": ref["photo_path"],
                "label": ref["label"],
                "nbytes": len(data or b""),
            }
            if error is not None:
                unreadable = {"key": ref["photo_key"], "status": "rejected", "reason": "unreadable", "detail": error}
                yield {**base, **unreadable}, None
                continue
            try:
                rgb, fmt, (w, h) = decode_rgb(
                    data or b"", max_pixels=settings["max_pixels"], target_short_side=settings.get("decode_short_side")
                )
            except ImageRejected as exc:
                reason, detail = exc.reason, exc.detail[:200]
                yield {**base, "key": ref["photo_key"], "status": "rejected", "reason": reason, "detail": detail}, None
                continue
            base.update(format=fmt, width=w, height=h)
            for fields, crop in crop_fn(rgb, ref):
                row = {**base, **fields}
                files = None
                if crop is not None:
                    meta = {k: row[k] for k in SAMPLE_META if k in row}
                    files = {SAMPLE_EXT: encode_ppm(crop), "json": json.dumps(meta, sort_keys=True).encode()}
                yield row, files


# The per-sample JSON next to each crop in the staging shards.
SAMPLE_META = (
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


def prepare_photo_stage(
    photos: str | Path, work: Path, name: str, settings: FacesSettings | IngestSettings
) -> tuple[Path, ExtractionPlan]:
    """Index the collection and plan (or extend the plan of) its parts; refuse other settings or changed photos."""
    if not _SAFE.match(name):
        raise StageError(f"source name {name!r} may hold only letters, digits, '_' and '-'")
    plan_settings = face_plan(settings) if isinstance(settings, FacesSettings) else ingest_plan(settings)
    src = open_source(photos)
    out_dir = Path(work) / "extract" / name
    full = {**plan_settings, "photos": src.path, "kind": src.kind, "part_size": settings.part_size}
    kind = PhotoKind(src, full, full["stage"], name)
    return out_dir, plan_extraction(out_dir, kind, full, settings.part_size)


def photo_kind(out_dir: Path) -> PhotoKind:
    """The source kind of an existing photo extraction, from its plan."""
    settings = read_json(out_dir / "plan.json", refresh_hint(out_dir))["settings"]
    return PhotoKind(PhotoSource(settings["photos"], settings["kind"]), settings, settings["stage"], out_dir.name)


def run_photo_part(out_dir: Path, part: int) -> dict:
    """Process one part of the photo index into `part-NNNNNN.{tar,parquet}` (skipped if complete)."""
    return run_part(out_dir, part, photo_kind(out_dir))


def merge_photo_manifests(out_dir: Path) -> pa.Table:
    """Concatenate part manifests; verify every indexed photo is accounted for exactly once."""
    return merge_manifests(out_dir, photo_kind(out_dir))


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
    """Plan, process the parts still to do on a process pool, merge (the Prefect-free driver)."""
    out_dir, plan = prepare_photo_stage(photos, work, name, settings)
    job = partial(run_photo_part, out_dir)
    run_parts(job, plan.todo, workers or os.cpu_count() or 1, process_pool, name)
    return merge_photo_manifests(out_dir)
