"""Samples as PNG files and WebDataset tars, and the generator as TorchScript and ONNX (CPU, tiny run)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dcgan.evaluation.quality import generate, prior_noise
from dcgan.evaluation.runs import load_run
from dcgan.export import BATCH, ExportError, export_generator, generate_samples, noise_batches
from dcgan.train import TrainConfig, train
from preprocessing.errors import UserError
from preprocessing.tar_shards import iter_samples


@pytest.fixture(scope="module")
def tiny_run(shards_dir: Path) -> Path:
    run = shards_dir.parent / "train" / "export-run"
    if not (run / "checkpoints").exists():
        cfg = dict(steps=2, resolution=32, batch_size=16, ngf=8, ndf=8, device="cpu", best_images=0, tensorboard=False)
        train(TrainConfig(shards=str(shards_dir), run_dir=str(run), **cfg))
    return run


def decode_png(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(("noise", "nz"), [("uniform", 100), ("normal", 100), ("normal", 7)])
def test_batched_noise_is_the_evaluation_prior(noise: str, nz: int) -> None:
    n = 2 * BATCH + 37
    assert torch.equal(torch.cat(list(noise_batches(nz, noise, n, 5))), prior_noise(nz, noise, n, 5))


def test_png_samples_are_the_generator_on_the_seeded_prior(tiny_run: Path, tmp_path: Path) -> None:
    n = BATCH + 4  # two batches
    result = generate_samples(tiny_run, n, tmp_path / "pngs", seed=3)
    cfg, G, _, step = load_run(tiny_run)
    files = sorted((tmp_path / "pngs").iterdir())
    assert result == {"out": str(tmp_path / "pngs"), "format": "png", "samples": n, "seed": 3, "step": step}
    assert [f.name for f in files[:2]] == ["00000000.png", "00000001.png"] and len(files) == n
    expected = generate(G, prior_noise(cfg["nz"], cfg["noise"], n, 3))
    for i in (0, BATCH - 1, BATCH, n - 1):
        assert np.array_equal(decode_png(files[i].read_bytes()), expected[i])
    assert [p.name for p in tmp_path.iterdir()] == ["pngs"]  # no temporary directory left


def test_tar_samples_are_a_webdataset_with_safe_keys(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "samples.tar"
    generate_samples(tiny_run, 5, out, seed=1)
    samples = list(iter_samples(out))
    cfg, G, _, step = load_run(tiny_run)
    expected = generate(G, prior_noise(cfg["nz"], cfg["noise"], 5, 1))
    assert [k for k, _ in samples] == [f"{i:08d}" for i in range(5)]
    for i, (_, files) in enumerate(samples):
        assert set(files) == {"png", "json"} and np.array_equal(decode_png(files["png"]), expected[i])
        assert json.loads(files["json"]) == {"index": i, "seed": 1, "run": "export-run", "step": step}
    generate_samples(tiny_run, 2, out)  # a tar is replaced atomically
    assert len(list(iter_samples(out))) == 2


def test_bad_sample_requests_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    for n in (0, -3, 2.5, True):
        with pytest.raises(ExportError, match="integer >= 1"):
            generate_samples(tiny_run, n, tmp_path / "x")  # type: ignore[arg-type]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"old")
    with pytest.raises(ExportError, match="not an empty directory"):
        generate_samples(tiny_run, 1, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["old.png"]
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(ExportError, match="is a directory"):
        generate_samples(tiny_run, 1, tmp_path / "dir.tar")
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated in torch 2.14
def test_torchscript_export_takes_any_batch_and_matches_pytorch(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.pt"
    result = export_generator(tiny_run, "torchscript", out)
    cfg, G, _, step = load_run(tiny_run)
    assert result["max_abs_diff"] <= 1e-4 and result["nz"] == cfg["nz"] and result["step"] == step
    extra = {"dcgan.json": ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["dcgan.json"])["noise"] == cfg["noise"]
    with torch.no_grad():
        for n in (1, 6):
            z = prior_noise(cfg["nz"], cfg["noise"], n, 11)
            assert torch.allclose(model(z), G(z), atol=1e-4, rtol=0)


def test_onnx_export_takes_any_batch_and_matches_pytorch(tiny_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "g.onnx"
    result = export_generator(tiny_run, "onnx", out)
    cfg, G, _, step = load_run(tiny_run)
    assert result["max_abs_diff"] <= 1e-4 and result["format"] == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # one file: weights inside
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dcgan"])
    assert meta["nz"] == cfg["nz"] and meta["step"] == step and meta["resolution"] == 32
    with torch.no_grad():
        for n in (1, 6):
            z = prior_noise(cfg["nz"], cfg["noise"], n, 11)
            images = session.run(None, {"z": z.numpy()})[0]
            assert images.shape == (n, 3, 32, 32)
            assert np.abs(images - G(z).numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_unknown_format_and_a_failed_check_leave_nothing(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ExportError, match=r"one of \('torchscript', 'onnx'\), got 'pickle'"):
        export_generator(tiny_run, "pickle", tmp_path / "g.pkl")
    monkeypatch.setattr("dcgan.export.TOLERANCE", -1.0)  # no export can pass: the check must refuse it
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_generator(tiny_run, "torchscript", tmp_path / "g.pt")
    assert list(tmp_path.iterdir()) == []
    assert issubclass(ExportError, UserError)
