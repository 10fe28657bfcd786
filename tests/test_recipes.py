"""The reproduction recipes (configs/faces, cifar10, imagenet32-to-cifar10) stay valid: each runs
its whole DAG on a slice of its own data for two steps, with its own settings otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SHARED
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config

RECIPES = ("faces", "cifar10", "imagenet32-to-cifar10")
SMALL = {  # a slice of each source and a two-step run; everything else is the recipe's own
    "train": {"steps": 2, "batch_size": 16, "sample_every": 2, "checkpoint_every": 2, "log_every": 1},
    "evaluate": {"limit_train": 200, "limit_test": 100, "swd_images": 64, "guided_images": 32},
}


def on_shared(path: str) -> Path:
    """A recipe's `../shared/...` path, wherever this checkout's shared folder is (DCGAN_SHARED)."""
    return SHARED / path.removeprefix("../shared/") if path.startswith("../shared/") else ROOT / path


def small_copy(recipe: str, tmp_path: Path, rows: int) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())
    source = raw["sources"][0]
    key = "photos" if source["type"] == "faces" else "images"
    table = pq.read_table(on_shared(source[key]))
    pq.write_table(table.slice(0, rows), tmp_path / "slice.parquet")
    source[key] = str(tmp_path / "slice.parquet")
    if "model" in source:
        source["model"] = str(on_shared(source["model"]))
    raw["work"] = str(tmp_path / "work")
    for section, small in SMALL.items():
        raw[section] = {**raw.get(section, {}), **small}
    if "cifar10" in raw["evaluate"]:
        raw["evaluate"]["cifar10"] = str(on_shared(raw["evaluate"]["cifar10"]))
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_valid_as_shipped(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented command works from the repository root: every path exists, every section validates."""
    monkeypatch.chdir(ROOT)
    beside = ROOT.parent / "shared"
    if not (beside.exists() and SHARED.samefile(beside)):
        pytest.skip("the recipes name ../shared; DCGAN_SHARED points elsewhere")
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert cfg.train.enabled and cfg.evaluate.enabled and cfg.work == f"work/{recipe.split('-')[0]}"
    if recipe != "faces":
        assert cfg.train.resolution == 32 and cfg.evaluate.cifar10 is not None
    if recipe == "imagenet32-to-cifar10":
        assert cfg.train.discriminator == "imagenet32"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end_in_small(prefect_api: None, tmp_path: Path, recipe: str) -> None:
    config = small_copy(recipe, tmp_path, rows=240 if recipe == "faces" else 400)
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    cfg = load_config(config)
    work = Path(cfg.work)
    (run,) = (work / "train").iterdir()
    metrics = yaml.safe_load((work / "eval" / run.name / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["guided_backprop"]["trained_D"]["channels"]
    if cfg.evaluate.cifar10:
        assert set(metrics["cifar10"]) == {"trained_D", "random_D", "raw_pixels"}
    if cfg.evaluate.arithmetic:
        assert metrics["arithmetic"]["expression"]
        assert (work / "eval" / run.name / "figures" / "vector_arithmetic.png").exists()
    report = (work / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (work / link).exists(), f"report.md links a missing image: {link}"
