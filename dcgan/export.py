"""Use a trained generator outside this project: samples as files, the network as TorchScript or ONNX.

`generate_samples` writes N samples as PNG files or as one WebDataset tar, a batch at a time
so memory stays flat for any N; sample i is G(z_i) with z = prior_noise(nz, prior, N, seed),
the evaluation's noise. `export_generator` writes the generator (eval mode: batchnorm uses
its running statistics) as one file that takes z of shape (N, nz) for any N and returns
(N, 3, H, W) images in [-1, 1]. Each exported file is run on the same z as PyTorch before it
is renamed into place and must agree to 1e-4, so a broken export is never left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dcgan.evaluation.quality import generate
from dcgan.evaluation.runs import load_run
from preprocessing.atomic import atomic_write_with
from preprocessing.errors import UserError
from preprocessing.tar_shards import TarShardWriter

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
BATCH = 256  # rows of z per batch: a multiple of 16, so batched draws equal one draw of all N (see noise_batches)
META_KEY = "dcgan"  # TorchScript extra file / ONNX metadata entry with nz, prior, resolution, step


class ExportError(UserError):
    """Bad export arguments, or an exported model that does not reproduce PyTorch's output."""


def noise_batches(nz: int, noise: str, n: int, seed: int) -> Iterator[torch.Tensor]:
    """prior_noise(nz, noise, n, seed) in batches of BATCH rows, from one generator.

    CPU draws of multiples of 16 values continue the same stream as one large draw (torch's
    normal sampler works in blocks of 16), so the concatenated batches equal prior_noise's z.
    """
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, BATCH):
        rows = min(BATCH, n - start)
        yield torch.rand(rows, nz, generator=g) * 2 - 1 if noise == "uniform" else torch.randn(rows, nz, generator=g)


def _png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def generate_samples(
    run_dir: Path, n: int, out: Path, seed: int = 0, checkpoint: Path | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Write `n` samples of a run to `out`: a WebDataset tar when it ends with .tar, else a directory of PNGs.

    Files are `<out>/{i:08d}.png`; tar samples are keys `{i:08d}` with `.png` and `.json`
    (index, seed, run, step). The tar is written to a temporary name and renamed; the
    directory is filled under a temporary name and renamed into place, and must not exist yet
    or be empty, so samples of an earlier call never mix with these.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ExportError(f"the number of samples must be an integer >= 1, got {n!r}")
    out = Path(out)
    as_tar = out.suffix == ".tar"
    if as_tar and out.is_dir():
        raise ExportError(f"{out} is a directory; a .tar output must be a file path")
    if not as_tar and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new output directory")
    cfg, G, _, step = load_run(Path(run_dir), checkpoint)
    G.to(device)
    batches = noise_batches(cfg["nz"], cfg.get("noise", "uniform"), n, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    if as_tar:
        with TarShardWriter(out) as writer:
            for start, z in zip(range(0, n, BATCH), batches, strict=True):
                for i, image in enumerate(generate(G, z), start):
                    meta = {"index": i, "seed": seed, "run": Path(run_dir).name, "step": step}
                    writer.write(f"{i:08d}", {"png": _png(image), "json": json.dumps(meta).encode()})
    else:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            for start, z in zip(range(0, n, BATCH), batches, strict=True):
                for i, image in enumerate(generate(G, z), start):
                    (tmp / f"{i:08d}.png").write_bytes(_png(image))
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "format": "tar" if as_tar else "png", "samples": n, "seed": seed, "step": step}


def _check(expected: torch.Tensor, actual: np.ndarray, fmt: str) -> float:
    diff = float(np.abs(expected.numpy() - actual).max())
    if not diff <= TOLERANCE:
        raise ExportError(f"the {fmt} export differs from PyTorch by {diff:.3g} (> {TOLERANCE}); nothing was written")
    return diff


def _torchscript(G: nn.Module, meta: str, z: torch.Tensor, expected: torch.Tensor, tmp: Path) -> float:
    """torch.jit.script, not trace: the batch size stays symbolic."""
    torch.jit.save(torch.jit.script(G), str(tmp), _extra_files={f"{META_KEY}.json": meta})
    with torch.no_grad():
        return _check(expected, torch.jit.load(str(tmp)).eval()(z).numpy(), "torchscript")


def _onnx(G: nn.Module, meta: str, z: torch.Tensor, expected: torch.Tensor, tmp: Path) -> float:
    """torch.export-based exporter (torch's default; needs onnxscript), checked with onnxruntime."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter's dependency: fail here with a clear message)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime installed: {exc}") from exc
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        G,
        (z[:2],),
        None,
        dynamo=True,
        input_names=["z"],
        output_names=["images"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.model.metadata_props[META_KEY] = meta
    program.save(str(tmp), external_data=False)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return _check(expected, session.run(None, {"z": z.numpy()})[0], "onnx")


def export_generator(run_dir: Path, fmt: str, out: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Write a run's generator to `out` as `torchscript` or `onnx`, verified against PyTorch on the same z's.

    The file records nz, the prior, the resolution and the step (TorchScript extra file /
    ONNX metadata `dcgan`), which a consumer needs to draw z's the model expects.
    """
    if fmt not in FORMATS:
        raise ExportError(f"export format must be one of {FORMATS}, got {fmt!r}")
    cfg, G, _, step = load_run(Path(run_dir), checkpoint)
    G = G.cpu().eval()
    info = {
        "nz": cfg["nz"],
        "noise": cfg.get("noise", "uniform"),
        "resolution": cfg["resolution"],
        "step": step,
        "output": "images (N, 3, H, W) in [-1, 1]",
    }
    # exported from a batch of 2, checked on a batch of 5: a batch size baked into the graph fails the check
    z = torch.rand(5, cfg["nz"], generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = G(z)
    write = _torchscript if fmt == "torchscript" else _onnx
    result: dict[str, float] = {}

    def produce(tmp: Path) -> None:
        result["max_abs_diff"] = write(G, json.dumps(info), z, expected, tmp)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, produce)
    return {"path": str(out), "format": fmt, **info, **result}
