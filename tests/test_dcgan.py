"""DCGAN models and training: the paper's guidelines, exact resume, checkpoints and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan.checkpoint import CheckpointError, encode_checkpoint, list_checkpoints, load_checkpoint
from dcgan.data import CachedImages, DataError, shard_urls, stream_batches
from dcgan.models import Discriminator, Generator, init_weights
from dcgan.train import TrainConfig, Trainer, train

TINY = {"ngf": 8, "ndf": 8, "batch_size": 16, "resolution": 32, "log_every": 2}


def tiny_config(shards: Path, run: Path, **kw: object) -> TrainConfig:
    return TrainConfig(shards=str(shards), run_dir=str(run), **{**TINY, **kw})


@pytest.mark.parametrize("res", [32, 64, 128])
def test_shapes_for_every_resolution(res: int) -> None:
    G, D = Generator(res, ngf=8), Discriminator(res, ndf=8)
    img = G(torch.rand(4, 100) * 2 - 1)
    assert img.shape == (4, 3, res, res) and img.min() >= -1 and img.max() <= 1
    assert D(img).shape == (4,)


def test_architecture_follows_the_paper() -> None:
    G, D = Generator(64), Discriminator(64)
    for model in (G, D):
        assert not any(isinstance(m, nn.Linear | nn.MaxPool2d | nn.AvgPool2d) for m in model.modules())
    g_layers, d_layers = list(G.main), list(D.main)
    assert isinstance(g_layers[-1], nn.Tanh) and isinstance(g_layers[-2], nn.ConvTranspose2d)  # no BN on output
    assert isinstance(d_layers[0], nn.Conv2d) and isinstance(d_layers[1], nn.LeakyReLU)  # no BN on input
    assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU))
    assert sum(isinstance(m, nn.ReLU) for m in G.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs[:-1]] == [(2, 2)] * 4  # strided convolutions, no pooling
    assert convs[-1].out_channels == 1


def test_weight_init_is_normal_0_002() -> None:
    torch.manual_seed(0)
    G = Generator(64)
    G.apply(init_weights)
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    bn = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean() - 1) < 0.01


def test_paper_hyper_parameters_are_the_defaults() -> None:
    cfg = TrainConfig(shards="s", run_dir="r")
    assert (cfg.lr, cfg.beta1, cfg.batch_size, cfg.nz, cfg.noise) == (2e-4, 0.5, 128, 100, "uniform")
    trainer = Trainer(TrainConfig(shards="s", run_dir="r", resolution=32, ngf=8, ndf=8, device="cpu"))
    assert trainer.optD.param_groups[0]["betas"] == (0.5, 0.999)


def test_training_writes_samples_checkpoints_and_metrics(shards_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(tiny_config(shards_dir, run, steps=4, sample_every=2, checkpoint_every=2, keep_checkpoints=1))
    assert result["steps"] == 4
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004.pt"]  # pruned to keep=1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "img_per_s"} <= set(rows[0])
    state = load_checkpoint(list_checkpoints(run)[-1])  # weights_only=True inside
    assert state["step"] == 4 and {"G", "D", "optG", "optD", "rng", "fixed_noise"} <= set(state)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(shards_dir: Path, tmp_path: Path, precision: str) -> None:
    """Bit for bit, on the fp32 step and on the bf16 + channels_last + fused Adam step."""
    kw = dict(deterministic=True, precision=precision)
    straight = train(tiny_config(shards_dir, tmp_path / "a", steps=6, checkpoint_every=6, **kw))
    train(tiny_config(shards_dir, tmp_path / "b", steps=3, checkpoint_every=3, **kw))
    resumed = train(tiny_config(shards_dir, tmp_path / "b", steps=6, checkpoint_every=3, **kw), resume=True)
    assert straight["step_path"] == resumed["step_path"]
    assert ("bfloat16" in straight["step_path"]) == (precision == "bf16")
    a = load_checkpoint(Path(straight["checkpoint"]))
    b = load_checkpoint(Path(resumed["checkpoint"]))
    for part in ("G", "D"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["optD"]["state"][0]["exp_avg"].equal(b["optD"]["state"][0]["exp_avg"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated metric rows after resume
    # the same state gives the same bytes (so the same sha256) whether or not it came from a file
    loaded = {k: v for k, v in b.items() if k != "format"}
    assert encode_checkpoint(loaded) == Path(resumed["checkpoint"]).read_bytes()


def test_existing_run_is_not_overwritten_without_resume(shards_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(shards_dir, tmp_path / "r", steps=2))
    before = list_checkpoints(tmp_path / "r")[-1].read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny_config(shards_dir, tmp_path / "r", steps=4))
    assert list_checkpoints(tmp_path / "r")[-1].read_bytes() == before


def test_corrupted_checkpoint_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(tiny_config(shards_dir, run, steps=2))
    ckpt = list_checkpoints(run)[-1]
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(tiny_config(shards_dir, run, steps=4), resume=True)
    assert ckpt.stat().st_size == 1000  # nothing overwritten


def test_incompatible_checkpoint_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(tiny_config(shards_dir, run, steps=2))
    with pytest.raises(CheckpointError, match="incompatible model.*ngf"):
        train(tiny_config(shards_dir, run, steps=4, ngf=16), resume=True)


def test_resume_without_checkpoint_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoints"):
        train(tiny_config(shards_dir, tmp_path / "new", steps=2), resume=True)


def test_resolution_mismatch_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="32 px but training asked for 64"):
        train(tiny_config(shards_dir, tmp_path / "r", steps=2, resolution=64))


def test_batch_larger_than_dataset_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="larger than the dataset"):
        train(tiny_config(shards_dir, tmp_path / "r", steps=2, batch_size=61))


def test_missing_shards_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run the shard stage first"):
        train(tiny_config(tmp_path / "nothing", tmp_path / "r", steps=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        train(tiny_config(shards_dir, tmp_path / "r", steps=2, device="cuda"))


def test_cached_batches_cover_each_epoch_once(shards_dir: Path) -> None:
    urls, total = shard_urls(shards_dir, 32)
    cache = CachedImages(urls, total, seed=3)
    assert len(cache) == total == 60 and cache.images.dtype == torch.uint8
    seen = torch.cat([cache.batch(s, 20) for s in range(3)])  # exactly one epoch
    flat = {tuple(img.flatten()[:64].tolist()) for img in seen}
    assert len(flat) == 60
    assert torch.equal(cache.batch(7, 16), CachedImages(urls, total, seed=3).batch(7, 16))


def test_streaming_path_yields_batches(shards_dir: Path, tmp_path: Path) -> None:
    urls, total = shard_urls(shards_dir, 32)
    batches = stream_batches(urls, total, batch_size=8, seed=0, workers=0)
    first = next(batches)
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.uint8
    result = train(tiny_config(shards_dir, tmp_path / "s", steps=2, cache_gb=0, workers=0))
    assert result["steps"] == 2


def test_finite_training_run_on_copied_shards_is_reproducible(shards_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(shards_dir, tmp_path / "shards")
    a = train(tiny_config(tmp_path / "shards", tmp_path / "a", steps=2))
    b = train(tiny_config(shards_dir, tmp_path / "b", steps=2))
    assert a["final"]["loss_d"] == pytest.approx(b["final"]["loss_d"], rel=1e-5)
