"""Retrain, the registry CLI, generate and export, end to end on tiny runs of real shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dcgan.registry import load_registry, metric_text, registry_path
from flows.cli import app
from preprocessing.locks import hold, lock_path

runner = CliRunner()
TINY = ["--steps", "2", "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--device", "cpu", "--best-images", "0"]


@pytest.fixture
def work(tmp_path: Path, extracted_work: Path) -> Path:
    """Extracted photos and their first shard version (60 images, 32 px)."""
    dst = tmp_path / "work"
    shutil.copytree(extracted_work, dst)
    assert runner.invoke(app, ["shard", "--work", str(dst), "--maxcount", "25"]).exit_code == 0
    return dst


@pytest.mark.slow
def test_retrain_waits_for_new_data_and_promotes_only_a_better_model(prefect_api: None, work: Path) -> None:
    trained = runner.invoke(app, ["train", "--work", str(work), "--resolution", "32", "--run", "base", *TINY])
    assert trained.exit_code == 0, trained.output
    registry = load_registry(work)
    assert registry.champion == "base" and registry.runs["base"].dataset_version == 1  # the first run: champion
    assert "no champion yet" in registry.history[-1]["why"]

    same = runner.invoke(app, ["retrain", "--work", str(work)])
    assert same.exit_code == 0 and "skipped" in same.output and "version 1" in same.output, same.output
    assert "Nothing to do" in (work / "reports" / "retrain.md").read_text()

    shutil.copytree(work / "extract" / "photos_train", work / "extract" / "more")  # the data grows
    assert runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "25"]).exit_code == 0
    kept = runner.invoke(app, ["retrain", "--work", str(work), "--margin", "0.99"])  # must be 99% better: kept
    assert kept.exit_code == 0 and "kept" in kept.output, kept.output
    registry = load_registry(work)
    challenger = next(n for n in registry.runs if n.startswith("retrain-v2-"))
    assert registry.champion == "base" and registry.runs[challenger].settings["steps"] == 2  # the champion's settings
    assert [h["action"] for h in registry.history][-1] == "keep"
    report = (work / "reports" / "retrain.md").read_text()
    assert "Kept the champion" in report
    listed = runner.invoke(app, ["models", "--work", str(work)]).output
    for run in ("base", challenger):  # one source: the report and `models` show the same measurement
        swd = metric_text(registry.runs[run].metrics, "swd")
        assert f" {swd} " in report and f" {swd} " in listed, (swd, report, listed)
    tried = runner.invoke(app, ["retrain", "--work", str(work)])  # the same data again: that challenger lost
    assert tried.exit_code == 0 and "skipped" in tried.output and challenger in tried.output

    forced = runner.invoke(app, ["retrain", "--work", str(work), "--force", "--steps", "3"])
    assert forced.exit_code == 0 and ("promoted" in forced.output or "kept" in forced.output), forced.output
    assert len(load_registry(work).runs) == 3

    listing = runner.invoke(app, ["models", "--work", str(work)])
    champion = load_registry(work).champion
    assert listing.exit_code == 0 and f"* {champion}" in listing.output and challenger in listing.output
    manual = runner.invoke(
        app, ["models", "--work", str(work), "--promote", challenger, "--who", "ann", "--why", "sharper"]
    )
    assert manual.exit_code == 0 and f"* {challenger}" in manual.output
    last = load_registry(work).history[-1]
    assert (last["action"], last["who"], last["why"], last["previous"]) == (
        "manual-promote",
        "ann",
        "sharper",
        champion,
    )


def test_bad_registry_states_are_clear_errors(prefect_api: None, work: Path) -> None:
    registry_path(work).parent.mkdir(parents=True)
    registry_path(work).write_text("{not json")
    result = runner.invoke(app, ["retrain", "--work", str(work), *TINY])
    assert result.exit_code == 2 and "registry" in result.output
    assert registry_path(work).read_text() == "{not json"  # never overwritten
    registry_path(work).unlink()
    with hold(lock_path(work, "retrain"), "retrain", command="deployment retrain/retrain, flow run calm-owl"):
        busy = runner.invoke(app, ["retrain", "--work", str(work), "--no-wait", *TINY])
    assert busy.exit_code == 2 and "retrain is busy" in busy.output and "calm-owl" in busy.output
    none = runner.invoke(app, ["generate", "--work", str(work), "--n", "2", "--out", str(work / "g")])
    assert none.exit_code == 2 and "no champion yet" in none.output


@pytest.mark.slow
def test_generate_and_export_the_champion(prefect_api: None, work: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["train", "--work", str(work), "--resolution", "32", "--run", "g", *TINY]).exit_code == 0
    pngs = runner.invoke(app, ["generate", "--work", str(work), "--run", "g", "--n", "5", "--out", str(tmp_path / "s")])
    assert pngs.exit_code == 0, pngs.output
    assert f"Wrote 5 PNG files in {tmp_path / 's'}, from g at step 2 (z seed 0).\n" in pngs.output
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 5 and Image.open(files[0]).size == (32, 32)
    tar = runner.invoke(
        app, ["generate", "--work", str(work), "--run", "g", "--n", "3", "--out", str(tmp_path / "s.tar")]
    )
    assert tar.exit_code == 0 and (tmp_path / "s.tar").stat().st_size > 0
    out = tmp_path / "g.pt"
    exported = runner.invoke(
        app, ["export", "--work", str(work), "--run", "g", "--format", "torchscript", "--out", str(out)]
    )
    assert exported.exit_code == 0 and out.exists(), exported.output
    said = exported.output.strip().splitlines()[-1]
    assert said.startswith("Exported the generator of g (step 2) as torchscript to ") and said.endswith(".")
    assert "{" not in exported.output and "matches PyTorch on the same z's" in said
    bad = runner.invoke(app, ["export", "--work", str(work), "--run", "g", "--format", "pickle", "--out", str(out)])
    assert bad.exit_code == 2 and "torchscript" in bad.output


def test_a_new_shard_version_emits_the_dataset_event(
    prefect_api: None, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.shard

    events: list[dict] = []
    monkeypatch.setattr(flows.shard, "emit_event", lambda **kw: events.append(kw))
    shutil.copytree(work / "extract" / "photos_train", work / "extract" / "more")
    assert runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "25"]).exit_code == 0
    assert runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "25"]).exit_code == 0  # nothing new
    assert len(events) == 1 and events[0]["event"] == "dcgan.dataset.updated"
    assert events[0]["payload"] == {"work": str(work.resolve()), "version": 2, "added": 60, "total": 120}
    assert events[0]["resource"]["prefect.resource.id"] == f"dcgan.work.{work.resolve()}"
    assert json.loads((work / "shards" / "versions.json").read_text())[-1]["added_per_source"] == {"more": 60}
