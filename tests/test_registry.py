"""The model registry, the champion decision, and the fixed comparison protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dcgan.evaluation.fixed_protocol import comparison_figure, fixed_protocol
from dcgan.registry import (
    RegistryError,
    challenge,
    decide,
    load_registry,
    promote,
    register_run,
    registry_path,
)
from dcgan.train import TrainConfig, train
from preprocessing.errors import UserError

PROTOCOL = {"name": "fixed-v1", "images": 1024, "reference_sha256": "ab", "reference_seed": 0, "z_seed": 7}


def metrics(swd: float, **extra: object) -> dict:
    return {"protocol": PROTOCOL, "swd": swd, **extra}


@pytest.fixture(scope="module")
def two_runs(shards_dir: Path) -> tuple[Path, Path]:
    """Two tiny runs of different seeds and lengths: a champion and a challenger."""
    runs = []
    for name, steps, seed in (("registry-a", 2, 0), ("registry-b", 3, 1)):
        run = shards_dir.parent / "train" / name
        if not (run / "checkpoints").exists():
            cfg = dict(resolution=32, batch_size=16, ngf=8, ndf=8, device="cpu", best_images=0, tensorboard=False)
            train(TrainConfig(shards=str(shards_dir), run_dir=str(run), steps=steps, seed=seed, **cfg))
        runs.append(run)
    return runs[0], runs[1]


def test_decide_promotes_only_by_the_relative_margin() -> None:
    first = decide(None, metrics(50.0))
    assert first.promote and first.champion is None and "no champion yet" in first.reason
    assert decide(metrics(50.0), metrics(44.0), margin=0.1).promote  # 12% lower
    kept = decide(metrics(50.0), metrics(46.0), margin=0.1)  # 8% lower: not enough
    assert not kept.promote and kept.champion == 50.0 and kept.challenger == 46.0 and "does not beat" in kept.reason
    assert not decide(metrics(50.0), metrics(50.0)).promote  # a tie keeps the champion
    assert decide(metrics(50.0), metrics(49.9)).promote
    assert decide(metrics(-0.002, kid=-0.002), metrics(0, kid=-0.003), metric="kid", margin=0.1).promote
    assert not decide(metrics(-0.002, kid=-0.002), metrics(0, kid=-0.0021), metric="kid", margin=0.1).promote
    assert not decide(metrics(50.0), metrics(float("nan"))).promote
    assert decide(metrics(float("inf")), metrics(80.0)).promote


def test_decide_refuses_what_does_not_compare() -> None:
    with pytest.raises(RegistryError, match="metric must be one of"):
        decide(None, metrics(1.0), metric="memorisation_ratio")
    with pytest.raises(RegistryError, match="margin"):
        decide(metrics(1.0), metrics(1.0), margin=-0.1)
    with pytest.raises(RegistryError, match="challenger's metrics have no number 'fid'"):
        decide(metrics(1.0, fid=3.0), metrics(1.0), metric="fid")
    other = {**metrics(1.0), "protocol": {**PROTOCOL, "reference_sha256": "cd"}}
    with pytest.raises(RegistryError, match="different protocols.*measure the champion again"):
        decide(metrics(2.0), other)
    inception = {**metrics(1.0, fid=9.0), "protocol": {**PROTOCOL, "inception_sha256": "ef"}}
    assert decide(metrics(2.0), inception).promote  # SWD does not depend on the Inception weights
    with pytest.raises(RegistryError, match="different protocols"):
        decide(metrics(2.0, fid=10.0), inception, metric="fid")


def test_register_challenge_and_promote_keep_a_history(tmp_path: Path) -> None:
    assert load_registry(tmp_path).champion is None  # no file yet: an empty registry
    register_run(tmp_path, "run-a", tmp_path / "train/run-a", 1, {"steps": 10}, metrics(50.0))
    assert challenge(tmp_path, "run-a").promote  # the first run becomes champion
    register_run(tmp_path, "run-b", tmp_path / "train/run-b", 2, {"steps": 20}, metrics(48.0))
    assert not challenge(tmp_path, "run-b", margin=0.1).promote
    assert load_registry(tmp_path).champion == "run-a"
    promote(tmp_path, "run-b", who="alice", why="sharper faces on the comparison sheet")
    registry = load_registry(tmp_path)
    assert registry.champion == "run-b" and registry.runs["run-b"].dataset_version == 2
    assert registry.runs["run-b"].settings == {"steps": 20} and registry.runs["run-b"].metrics["swd"] == 48.0
    actions = [(h["action"], h["run"]) for h in registry.history]
    assert actions == [
        ("register", "run-a"), ("promote", "run-a"), ("register", "run-b"), ("keep", "run-b"),
        ("manual-promote", "run-b"),
    ]  # fmt: skip
    manual = registry.history[-1]
    assert manual["who"] == "alice" and manual["previous"] == "run-a" and manual["why"].startswith("sharper")
    assert registry.history[3]["decision"]["champion"] == 50.0 and "at" in manual
    on_disk = json.loads(registry_path(tmp_path).read_text())
    assert on_disk["format"] == "dcgan-pipeline-registry/1" and on_disk["champion"] == "run-b"
    fresh = metrics(60.0)  # the champion re-measured on a new protocol replaces its stored metrics
    register_run(tmp_path, "run-c", tmp_path / "train/run-c", 3, {}, metrics(55.0))
    assert challenge(tmp_path, "run-c", champion_metrics=fresh).promote
    registry = load_registry(tmp_path)
    assert registry.runs["run-b"].metrics == fresh  # one source: what the decision used is what models shows
    assert [h["action"] for h in registry.history][-2:] == ["re-measure", "promote"]


def test_bad_requests_are_clear_errors_and_change_nothing(tmp_path: Path) -> None:
    register_run(tmp_path, "run-a", tmp_path / "a", 1, {}, metrics(50.0))
    before = registry_path(tmp_path).read_bytes()
    with pytest.raises(RegistryError, match=r"run 'nope' is not registered \(registered: \['run-a'\]\)"):
        promote(tmp_path, "nope", who="bob", why="because")
    with pytest.raises(RegistryError, match="not registered"):
        challenge(tmp_path, "nope")
    with pytest.raises(RegistryError, match="non-empty 'why'"):
        promote(tmp_path, "run-a", who="bob", why=" ")
    with pytest.raises(RegistryError, match="already registered"):
        register_run(tmp_path, "run-a", tmp_path / "a2", 2, {}, metrics(40.0))
    for name, version, settings in (("../x", 1, {}), ("ok", -1, {}), ("ok", True, {}), ("ok", 1, {"p": Path("x")})):
        with pytest.raises(RegistryError):
            register_run(tmp_path, name, tmp_path / "x", version, settings, metrics(1.0))  # type: ignore[arg-type]
    assert registry_path(tmp_path).read_bytes() == before
    assert issubclass(RegistryError, UserError)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the model registry"),
        ("[]", "not a valid model registry"),
        ('{"format": "dcgan-pipeline-registry/1", "champion": null, "runs": [], "history": []}', "runs must be"),
        (
            '{"format": "dcgan-pipeline-registry/1", "champion": "x", "runs": {}, "history": []}',
            "champion 'x' is not a registered run",
        ),
        (
            '{"format": "dcgan-pipeline-registry/1", "champion": null, "history": [],'
            ' "runs": {"a": {"run_dir": "a", "dataset_version": "1", "settings": {}, "metrics": {},'
            ' "registered_at": "t"}}}',
            "dataset_version must be of type int",
        ),
    ],
)
def test_a_corrupt_registry_is_refused_and_never_overwritten(tmp_path: Path, content: str, message: str) -> None:
    path = registry_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RegistryError, match=message) as err:
        load_registry(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(RegistryError, match=message):
        register_run(tmp_path, "run-a", tmp_path / "a", 1, {}, metrics(1.0))
    with pytest.raises(RegistryError, match=message):
        promote(tmp_path, "run-a", who="bob", why="test")
    assert path.read_text() == content


def test_fixed_protocol_measures_every_run_on_the_same_images(two_runs: tuple[Path, Path], shards_dir: Path) -> None:
    a, b = two_runs
    ma = fixed_protocol(a, shards_dir, n_images=48)
    mb = fixed_protocol(b, shards_dir, n_images=48)
    assert ma["protocol"] == mb["protocol"] and ma["protocol"]["images"] == 48
    assert ma["swd"] != mb["swd"] and ma["step"] == 2 and mb["step"] == 3
    assert set(ma["swd_levels"]) == {"32", "16"} and ma["swd"] == pytest.approx(
        np.mean(list(ma["swd_levels"].values()))
    )
    assert ma["memorisation_ratio"] > 0 and ma["checkpoint"].endswith("step-00000002.pt")
    assert fixed_protocol(a, shards_dir, n_images=48) == ma  # deterministic: seeds do not depend on the run
    assert fixed_protocol(a, shards_dir, n_images=40)["protocol"] != ma["protocol"]
    json.dumps(ma)  # storable in the registry as is
    decision = decide(ma, mb)
    assert decision.promote == (mb["swd"] < ma["swd"])
    figure = comparison_figure(a, b)
    assert figure.dtype == np.uint8 and figure.shape == (18 + 8 * 34 + 2, 2 * (8 * 34 + 2) + 12, 3)


def test_fixed_protocol_adds_fid_and_kid_with_local_inception_weights(
    two_runs: tuple[Path, Path], shards_dir: Path, tmp_path: Path
) -> None:
    import torch

    from dcgan.evaluation.inception import fid_inception

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(fid_inception().state_dict(), weights)  # the FID network's layout; random weights suffice here
    m = fixed_protocol(two_runs[0], shards_dir, n_images=8, inception=weights)
    assert np.isfinite(m["fid"]) and np.isfinite(m["kid"]) and m["kid_std"] >= 0
    assert len(m["protocol"]["inception_sha256"]) == 64
