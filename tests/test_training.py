"""The training step paths, NaN rollback, best checkpoint, monitoring and data parallelism (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcgan.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dcgan.data import CachedImages, shard_urls
from dcgan.launch import torchrun_command
from dcgan.precision import use_bfloat16
from dcgan.step import METRICS, StepOptions
from dcgan.train import TrainConfig, Trainer, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def tiny(shards: Path, run: Path, **kw: object) -> TrainConfig:
    base = dict(resolution=32, ngf=8, ndf=8, batch_size=16, device="cpu", log_every=1, best_images=0)
    return TrainConfig(shards=str(shards), run_dir=str(run), **{**base, **kw})


def run_steps(cfg: TrainConfig, options: StepOptions, steps: int) -> tuple[list[list[float]], Trainer]:
    """Per-step statistics of `steps` updates on the same cached batches and noise."""
    trainer = Trainer(cfg, options=options)
    urls, total = shard_urls(Path(cfg.shards), cfg.resolution)
    cache = CachedImages(urls, total, cfg.seed)
    rows = []
    for step in range(steps):
        trainer.acc.zero_()
        trainer.runner(cache.batch(step, cfg.batch_size), trainer.noise(step))
        rows.append(trainer.acc.tolist())
    return rows, trainer


def test_fast_step_tracks_the_textbook_step(shards_dir: Path, tmp_path: Path) -> None:
    """Same seed, data and noise: BCE-with-logits and G-only backward give the textbook's numbers."""
    cfg = tiny(shards_dir, tmp_path / "r")
    textbook, tb = run_steps(cfg, StepOptions(textbook=True), 6)
    for options in (StepOptions(), StepOptions(fast_layers=True)):
        ours, fast = run_steps(cfg, options, 6)
        for a, b in zip(textbook, ours, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), dict(zip(METRICS, zip(a, b, strict=True), strict=True))
        for model, fast_model in ((tb.G, fast.G), (tb.D, fast.D)):
            for name, p in model.state_dict().items():
                assert torch.allclose(p.float(), fast_model.state_dict()[name].float(), atol=1e-5), name


def test_bf16_channels_last_fused_adam_step_runs_and_stays_close(shards_dir: Path, tmp_path: Path) -> None:
    """The CUDA fast path's numerics (bf16 autocast, channels_last, fused Adam), exercised on CPU."""
    cfg = tiny(shards_dir, tmp_path / "r")
    textbook, _ = run_steps(cfg, StepOptions(textbook=True), 4)
    opts = StepOptions(autocast=torch.bfloat16, channels_last=True, fused_adam=True, fast_layers=True)
    fast, trainer = run_steps(cfg, opts, 4)
    assert trainer.optD.defaults["fused"] and next(trainer.G.parameters()).dtype == torch.float32
    for a, b in zip(textbook, fast, strict=True):
        assert a == pytest.approx(b, rel=0.05, abs=0.02)


def test_fast_paths_follow_precision_and_can_be_switched_off(shards_dir: Path, tmp_path: Path) -> None:
    """bf16 (+ channels_last) where `precision` says so, fused Adam everywhere, fast layers on the CPU only,
    CUDA graphs on CUDA only."""
    from dcgan.distributed import World
    from dcgan.train import step_options

    cfg = tiny(shards_dir, tmp_path / "r")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    bf16 = StepOptions(autocast=torch.bfloat16, channels_last=True, fused_adam=True, fast_layers=True)
    fp32 = StepOptions(fused_adam=True, fast_layers=True)
    assert step_options(tiny(shards_dir, tmp_path / "r", precision="fp32"), cpu, World()) == fp32
    assert step_options(tiny(shards_dir, tmp_path / "r", precision="bf16"), cpu, World()) == bf16
    assert step_options(cfg, cpu, World()) in (bf16, fp32)  # auto: timed once on this CPU
    assert step_options(cfg, cuda, World()) == StepOptions(
        autocast=torch.bfloat16, channels_last=True, fused_adam=True, cuda_graph=True
    )
    off = tiny(shards_dir, tmp_path / "r", precision="fp32", channels_last=False, fused_adam=False, cuda_graphs=False)
    assert step_options(off, cuda, World()) == StepOptions()
    assert step_options(off.model_copy(update={"fast_layers": False}), cpu, World()) == StepOptions()
    assert step_options(cfg, cuda, World(0, 2, 0)).cuda_graph is False  # DDP runs eager
    assert step_options(tiny(shards_dir, tmp_path / "r", loop="textbook"), cuda, World()).textbook


def poison_at(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> list[int]:
    """Make the n-th step call (0-based, counted across rollbacks) report a NaN loss."""
    from dcgan.step import StepRunner

    original = StepRunner.__call__
    seen = [0]

    def poisoned(self, real, z):  # noqa: ANN001, ANN202
        original(self, real, z)
        if seen[0] in calls:
            self.acc[0] = float("nan")
        seen[0] += 1

    monkeypatch.setattr(StepRunner, "__call__", poisoned)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_rolls_back_to_the_last_checkpoint_with_a_lower_lr(
    shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    run = tmp_path / "r"
    poison_at(monkeypatch, {4})  # step 5: after the checkpoint at step 4
    result = train(tiny(shards_dir, run, steps=8, checkpoint_every=4, keep_checkpoints=5, precision=precision))
    assert result["rollbacks"] == 1 and result["steps"] == 8
    assert result["final"]["lr"] == pytest.approx(1e-4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # the poisoned step was redone, not duplicated
    assert [r["lr"] for r in rows] == [2e-4] * 4 + [1e-4] * 4
    for ckpt in list_checkpoints(run):
        state = load_checkpoint(ckpt)
        assert all(torch.isfinite(v).all() for v in state["G"].values())
    assert load_checkpoint(list_checkpoints(run)[-1])["optG"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_nan_stops_cleanly_when_asked_or_out_of_rollbacks(
    shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_at(monkeypatch, {2, 3, 4, 5, 6, 7, 8, 9})
    run = tmp_path / "stop"
    with pytest.raises(TrainingDiverged, match="non-finite.*last checkpoint is intact"):
        train(tiny(shards_dir, run, steps=8, checkpoint_every=2, on_nan="stop"))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002.pt"]
    with pytest.raises(TrainingDiverged, match="after 2 rollbacks"):
        train(tiny(shards_dir, tmp_path / "again", steps=8, checkpoint_every=2, max_rollbacks=2))


def test_best_checkpoint_quality_log_tensorboard_events_and_progress_bar(
    shards_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    cfg = tiny(shards_dir, run, steps=6, checkpoint_every=2, sample_every=3, log_every=2, best_images=32)
    train(cfg, progress=True)
    assert "6/6" in capsys.readouterr().err
    quality = [json.loads(line) for line in (run / "quality.jsonl").read_text().splitlines()]
    assert [q["step"] for q in quality] == [2, 4, 6] and all(q["swd"] > 0 for q in quality)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["swd"] == min(q["swd"] for q in quality)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == best["step"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {f"train/{m}" for m in (*METRICS, "img_per_s", "lr")} <= set(tags["scalars"])
    assert "quality/swd" in tags["scalars"] and tags["images"] == ["samples"]
    assert [e.step for e in events.Scalars("train/loss_d")] == [2, 4, 6]


def test_resume_from_a_cuda_style_checkpoint_on_cpu(shards_dir: Path, tmp_path: Path) -> None:
    """A checkpoint saved by a fused, capturable Adam resumes with this run's own Adam flags."""
    run = tmp_path / "r"
    train(tiny(shards_dir, run, steps=2, checkpoint_every=2, fused_adam=False))
    path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)
    for opt in ("optG", "optD"):
        for group in state[opt]["param_groups"]:
            group.update(fused=True, capturable=True, foreach=None)
    path.unlink()
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, run, 2, keep=3)
    result = train(tiny(shards_dir, run, steps=4, checkpoint_every=2, fused_adam=False), resume=True)
    groups = load_checkpoint(Path(result["checkpoint"]))["optD"]["param_groups"]
    assert result["steps"] == 4 and not groups[0]["fused"] and not groups[0]["capturable"]


def test_a_new_lr_on_resume_wins(shards_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(tiny(shards_dir, run, steps=2, checkpoint_every=2))
    result = train(tiny(shards_dir, run, steps=4, checkpoint_every=2, lr=5e-5), resume=True)
    assert result["final"]["lr"] == pytest.approx(5e-5)


def test_data_parallel_training_with_torchrun_gloo(shards_dir: Path, tmp_path: Path) -> None:
    """Two CPU processes: rank 0 alone writes, replicas agree, and resume works under torchrun."""
    run = tmp_path / "ddp"
    config = tmp_path / "run.json"
    fields = dict(shards=str(shards_dir), run_dir=str(run), resolution=32, ngf=8, ndf=8, batch_size=8)
    config.write_text(json.dumps({**fields, "device": "cpu", "steps": 4, "log_every": 2, "checkpoint_every": 2}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(torchrun_command(config, 2), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert "rank 1" in done.stderr and "global 16" in done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one writer
    config.write_text(json.dumps({**fields, "device": "cpu", "steps": 6, "log_every": 2, "checkpoint_every": 2}))
    done = subprocess.run(
        torchrun_command(config, 2, resume=True), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000006.pt"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]


def test_train_throughput_benchmark_runs_on_cpu(shards_dir: Path) -> None:
    """bench/train_throughput.py end to end at a tiny size (its real numbers need a GPU)."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", "cpu", "--resolution", "32"]
    cmd += ["--batches", "16", "--steps", "2", "--warmup", "1", "--repeats", "1", "--width", "8"]
    cmd += ["--shards", str(shards_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout and "textbook" in done.stdout and "shards" in done.stdout


@pytest.mark.parametrize("damage", ["empty_index", "truncated_shard", "empty_shard", "garbage_index", "wrong_total"])
def test_empty_or_damaged_shards_are_clear_errors(shards_dir: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    from dcgan.data import DataError
    from preprocessing.sharding import ShardError
    from preprocessing.state import DamagedStateError

    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    index = json.loads((shards / "index.json").read_text())
    first = shards / index["shardlist"][0]["url"]
    if damage == "empty_index":
        (shards / "index.json").write_text(json.dumps({**index, "shardlist": [], "total": 0}))
        expected, message = ShardError, "lists no shards"
    elif damage == "garbage_index":
        (shards / "index.json").write_text("{not json")
        expected, message = DamagedStateError, "index.json is damaged .* -> rebuild the shards: .* --refresh"
    elif damage == "wrong_total":
        (shards / "index.json").write_text(json.dumps({**index, "total": index["total"] + 1}))
        expected, message = DataError, f"hold {index['total']} samples but their index lists {index['total'] + 1}"
    elif damage == "truncated_shard":
        first.write_bytes(first.read_bytes()[:5000])
        expected, message = DataError, "rebuild the shards"
    else:
        first.write_bytes(b"")
        expected, message = DataError, "rebuild the shards"
    with pytest.raises(expected, match=message):
        train(tiny(shards, tmp_path / "r", steps=2))
    assert not list_checkpoints(tmp_path / "r")


def test_resumed_adam_moments_take_the_layout_of_their_parameters(shards_dir: Path, tmp_path: Path) -> None:
    """A contiguous-layout checkpoint resumed by a channels_last model (fused CUDA Adam checks strides)."""
    run = tmp_path / "r"
    train(tiny(shards_dir, run, steps=2, checkpoint_every=2))
    trainer = Trainer(tiny(shards_dir, run), options=StepOptions(channels_last=True, fused_adam=True))
    trainer.load(list_checkpoints(run)[-1])
    conv = next(p for p in trainer.D.parameters() if p.dim() == 4 and p.shape[1] > 3)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert trainer.optD.state[conv]["exp_avg"].stride() == conv.stride()


def test_a_fixed_gpu_index_under_torchrun_is_a_clear_error() -> None:
    from dcgan.distributed import World, device_for

    with pytest.raises(ValueError, match="LOCAL_RANK"):
        device_for(World(1, 2, 1), "cuda:0")


@pytest.mark.slow
def test_train_flow_runs_data_parallel_under_torchrun(prefect_api: None, shards_dir: Path, tmp_path: Path) -> None:
    """The flow launches torchrun, streams the ranks' logs and publishes the result."""
    import shutil

    from dcgan.settings import TrainSettings
    from flows.train import train_flow

    work = tmp_path / "work"
    shutil.copytree(shards_dir, work / "shards")
    settings = TrainSettings(steps=2, resolution=32, batch_size=8, device="cpu", ngf=8, ndf=8, nproc_per_node=2)
    r = train_flow(str(work), settings, run="ddp")
    low = use_bfloat16("auto", "cpu")  # each rank makes the same timed decision as this process
    path = (
        "bfloat16 autocast, channels_last, fused Adam, fast layers, eager"
        if low
        else "fp32, fused Adam, fast layers, eager"
    )
    assert r["world_size"] == 2 and r["steps"] == 2 and r["step_path"] == path
    assert (work / "reports" / "train-ddp.md").read_text().count("8 x 2") == 1
