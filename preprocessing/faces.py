"""Face detection on photos and square face crops (the paper's face dataset).

Two OpenCV detectors behind one interface: the Haar cascade the paper used
(haarcascade_frontalface_default, bundled in opencv-python-headless, so it works offline)
and YuNet (cv2.FaceDetectorYN) from a local ONNX file. Both detect on a copy downscaled so
that the smallest face we would keep is still comfortably above the detector's own minimum:
faces below `min_face` are discarded anyway, so searching full resolution for them is waste.
Boxes are returned in source pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from preprocessing.errors import UserError

HAAR_FILE = "haarcascade_frontalface_default.xml"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


class DetectorError(UserError):
    """A detector that cannot be created from the given settings or model file."""


@dataclass(frozen=True)
class Face:
    x: int
    y: int
    w: int
    h: int
    score: float


@dataclass(frozen=True)
class DetectorConfig:
    """Detector settings; the defaults are the shipped ones measured in docs/benchmarks.md."""

    kind: str = "haar"  # "haar" | "yunet"
    model: str | None = None  # YuNet ONNX path
    min_face: int = 64  # keep faces whose box short side (source px) is at least this
    detect_face: int = 40  # search at a scale where min_face becomes this many pixels
    haar_scale: float = 1.08
    haar_neighbors: int = 5
    haar_min_score: float = 1.0  # cascade level weight; drops the weakest false positives
    yunet_score: float = 0.7
    yunet_nms: float = 0.3


class FaceDetector:
    """Create once per process (detectors are not picklable), then call `detect` per photo."""

    def __init__(self, cfg: DetectorConfig) -> None:
        if cfg.min_face < 8:
            raise DetectorError(f"min_face must be >= 8 px, got {cfg.min_face}")
        self.cfg = cfg
        if cfg.kind == "haar":
            path = Path(cv2.data.haarcascades) / HAAR_FILE
            self._haar = cv2.CascadeClassifier(str(path))
            if self._haar.empty():
                raise DetectorError(f"cannot load the Haar cascade {path}")
        elif cfg.kind == "yunet":
            if not cfg.model:
                raise DetectorError("the yunet detector needs --model PATH (face_detection_yunet_2023mar.onnx)")
            model = Path(cfg.model)
            if not model.is_file():
                raise DetectorError(f"YuNet model not found: {model}")
            try:
                self._yunet = cv2.FaceDetectorYN.create(
                    str(model), "", (320, 320), cfg.yunet_score, cfg.yunet_nms, 5000
                )
            except cv2.error as exc:
                raise DetectorError(f"cannot load YuNet model {model}: {exc}") from exc
        else:
            raise DetectorError(f"unknown detector {cfg.kind!r}; choose haar or yunet")

    @property
    def scale(self) -> float:
        """Downscale factor (<= 1) that maps min_face to detect_face pixels."""
        return min(1.0, self.cfg.detect_face / self.cfg.min_face)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces found, largest first, in source pixel coordinates."""
        r = self.scale
        small = rgb if r == 1.0 else cv2.resize(rgb, None, fx=r, fy=r, interpolation=cv2.INTER_AREA)
        faces = self._detect_haar(small) if self.cfg.kind == "haar" else self._detect_yunet(small)
        out = [
            Face(int(round(f.x / r)), int(round(f.y / r)), int(round(f.w / r)), int(round(f.h / r)), f.score)
            for f in faces
        ]
        return sorted(out, key=lambda f: -f.w * f.h)

    def _detect_haar(self, rgb: np.ndarray) -> list[Face]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)  # histogram equalisation measured worse
        side = max(24, int(0.8 * self.cfg.min_face * self.scale))  # 24: the cascade's own window
        boxes, _, weights = self._haar.detectMultiScale3(
            gray, self.cfg.haar_scale, self.cfg.haar_neighbors, minSize=(side, side), outputRejectLevels=True
        )
        return [
            Face(int(x), int(y), int(w), int(h), float(s))
            for (x, y, w, h), s in zip(boxes, weights, strict=True)
            if s >= self.cfg.haar_min_score
        ]

    def _detect_yunet(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        self._yunet.setInputSize((w, h))
        _, found = self._yunet.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if found is None:
            return []
        return [Face(int(f[0]), int(f[1]), int(f[2]), int(f[3]), float(f[-1])) for f in found]


def square_crop(rgb: np.ndarray, face: Face, size: int, margin: float) -> np.ndarray:
    """A square around the face, `margin` of its side added on each side, kept inside the photo."""
    h, w = rgb.shape[:2]
    side = int(round(max(face.w, face.h) * (1 + 2 * margin)))
    side = max(1, min(side, h, w))
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    crop = rgb[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
