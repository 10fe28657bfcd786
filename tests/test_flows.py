"""The Prefect flows and the CLI end to end on real photos, with the accounting invariant."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import DEMO_CONFIG, app
from flows.config import load_config
from preprocessing.lsun import open_env, write_lsun_lmdb
from preprocessing.tar_shards import iter_samples

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory: pytest.TempPathFactory, photo_values: list[bytes], bad_values: dict) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    db = root / "church_outdoor_train_lmdb"
    write_lsun_lmdb(db, photo_values + list(bad_values.values()))
    config = {
        "work": str(root / "work"),
        "sources": [{"type": "lsun", "db": str(db)}],
        "extract": {"size": 32, "part_size": 20},
        "dedup": {"max_epochs": 3},
        "shard": {"maxcount": 25},
        "train": {
            "steps": 4,
            "batch_size": 16,
            "ngf": 8,
            "ndf": 8,
            "sample_every": 2,
            "checkpoint_every": 2,
            "log_every": 2,
            "device": "cpu",
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _shard_digest(work: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((work / "shards").glob("*.tar")):
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_full_pipeline_accounts_for_every_item(prefect_api: None, pipeline_config: Path) -> None:
    result = runner.invoke(app, ["run", "--config", str(pipeline_config)])
    assert result.exit_code == 0, result.output
    cfg = load_config(pipeline_config)
    work = Path(cfg.work)
    with open_env(Path(cfg.sources[0].db)).begin() as txn:
        lmdb_keys = sorted(k.decode() for k in txn.cursor().iternext(values=False))
    manifest = pq.read_table(work / "extract" / "church_outdoor_train" / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in manifest) == lmdb_keys  # every input exactly once
    ok = sorted(r["key"] for r in manifest if r["status"] == "ok")
    assert len(ok) == 60
    codes = pq.read_table(work / "dedup" / "codes.parquet").to_pylist()
    assert sorted(r["key"] for r in codes) == ok  # every ok item exactly once in the dedup codes
    kept = sorted(f"church_outdoor_train/{r['key']}" for r in codes if r["keep"])
    shard_keys = [k for tar in sorted((work / "shards").glob("*.tar")) for k, _ in iter_samples(tar)]
    assert sorted(shard_keys) == kept  # every kept item exactly once in the final shards
    runs = list((work / "train").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "step-00000004.pt").exists()
    report = (work / "report.md").read_text()
    assert "LSUN extraction: church_outdoor_train" in report and "| rejected | 5 |" in report
    assert "too_many_pixels" in report and "# Shards" in report and "# Training" in report
    assert "# Near-duplicate removal" in report
    for name in ("extract-church-outdoor-train.png", "shards.png"):
        assert (work / "reports" / name).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_resumes_and_refresh_redoes_to_identical_shards(prefect_api: None, pipeline_config: Path) -> None:
    from prefect.client.orchestration import get_client

    cfg = load_config(pipeline_config)
    work = Path(cfg.work)
    if not (work / "shards").exists():
        assert runner.invoke(app, ["run", "--config", str(pipeline_config)]).exit_code == 0
    digest = _shard_digest(work)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (work / "extract" / "church_outdoor_train").glob("part-*.tar")}

    assert (
        runner.invoke(
            app, ["lsun", "--db", cfg.sources[0].db, "--work", str(work), "--size", "32", "--part-size", "20"]
        ).exit_code
        == 0
    )
    again = {p.name: p.stat().st_mtime_ns for p in (work / "extract" / "church_outdoor_train").glob("part-*.tar")}
    assert again == mtimes  # completed parts are not redone

    result = runner.invoke(
        app, ["lsun", "--db", cfg.sources[0].db, "--work", str(work), "--size", "32", "--part-size", "20", "--refresh"]
    )
    assert result.exit_code == 0, result.output
    redone = {p.name: p.stat().st_mtime_ns for p in (work / "extract" / "church_outdoor_train").glob("part-*.tar")}
    assert redone.keys() == mtimes.keys() and all(redone[k] != mtimes[k] for k in mtimes)
    assert runner.invoke(app, ["shard", "--work", str(work), "--maxcount", "25"]).exit_code == 0
    assert _shard_digest(work) == digest

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"extract-church-outdoor-train", "shards"} <= keys


@pytest.mark.slow
def test_train_cli_resumes_the_newest_run(prefect_api: None, shards_dir: Path) -> None:
    work = shards_dir.parent
    args = ["train", "--work", str(work), "--resolution", "32", "--batch-size", "16", "--device", "cpu"]
    first = runner.invoke(app, [*args, "--steps", "2", "--run", "r1"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert second.exit_code == 0, second.output
    assert "step 3" in second.output and (work / "train" / "r1" / "checkpoints" / "step-00000003.pt").exists()


def test_missing_database_exits_with_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["lsun", "--db", str(tmp_path / "missing_lmdb"), "--work", str(tmp_path / "w")])
    assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "w").exists()


def test_invalid_size_exits_with_clear_error(tmp_path: Path, photo_values: list[bytes]) -> None:
    db = tmp_path / "x_lmdb"
    write_lsun_lmdb(db, photo_values[:2])
    result = runner.invoke(app, ["lsun", "--db", str(db), "--work", str(tmp_path / "w"), "--size", "3"])
    assert result.exit_code == 2 and "size" in result.output
    assert not (tmp_path / "w").exists()


def test_invalid_config_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("work: w\nsources: [{type: lsun, db: x}]\nextract: {size: 64, colour: blue}\n")
    result = runner.invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "colour" in result.output
    assert runner.invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")]).exit_code == 2
    no_weights = tmp_path / "no_weights.yaml"
    no_weights.write_text("work: w\nsources: [{type: demo}]\nevaluate: {inception: /nowhere/pt_inception.pth}\n")
    result = runner.invoke(app, ["run", "--config", str(no_weights)])
    assert result.exit_code == 2 and "evaluate.inception: no file at" in result.output


def test_train_without_shards_exits_with_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--work", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2 and "shard stage" in result.output


def test_shipped_demo_config_is_the_cli_demo() -> None:
    shipped = (ROOT / "configs" / "demo.yaml").read_text()
    assert shipped == DEMO_CONFIG.format(work="work/demo", records=3000, steps=400)
    assert load_config(ROOT / "configs" / "demo.yaml").sources[0].type == "demo"


@pytest.mark.slow
def test_demo_report_tells_both_batches_the_training_evaluation_and_retrain(prefect_api: None, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--work", str(work), "--records", "300", "--grow", "120", "--steps", "2"])
    assert result.exit_code == 0, result.output
    report = (work / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("#")]
    for title in ("## First batch", "### Training", "### Evaluation", "## Second batch", "## Retrain", "### Retrain"):
        assert any(h.startswith(title) for h in headings), (title, headings)
    assert report.count("### Near-duplicate removal") == 2 and report.count("### Shards") == 2
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert any("first-batch/" in link for link in links) and any("second-batch/" in link for link in links)
    for link in links:
        assert (work / link).is_file(), f"report.md links a missing image: {link}"


def test_a_registered_run_on_these_shards_with_these_settings_is_found(shards_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from dcgan.registry import promote, register_run
    from dcgan.settings import TrainSettings
    from dcgan.train import TrainConfig
    from flows.train import trained_already

    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    shutil.copy(shards_dir / "index.json", work / "shards" / "index.json")
    version = json.loads((work / "shards" / "index.json").read_text())["version"]
    settings = TrainSettings(steps=4, resolution=32, ngf=8)
    assert trained_already(str(work), settings) is None  # no registry yet

    def run(name: str, trained: TrainSettings, dataset_version: int = version, extra: dict | None = None) -> Path:
        run_dir = work / "train" / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-00000004.pt").write_bytes(b"weights")
        cfg = TrainConfig(**trained.model_dump(), shards=str(work / "shards"), run_dir=str(run_dir))
        register_run(work, name, run_dir, dataset_version, {**cfg.model_dump(), **(extra or {})}, {"swd": 1.0})
        return run_dir

    run("older-data", settings, dataset_version=version - 1)
    run("more-steps", settings.model_copy(update={"steps": 5}))
    assert trained_already(str(work), settings) is None  # other shards, other settings: train

    same = run("same", settings, extra={"metric": "swd", "margin": 0.1})  # a retrain's settings hold more keys
    found = trained_already(str(work), settings)
    assert found["run"] == "same" and found["checkpoint"].endswith("step-00000004.pt")
    assert f"run same (not the champion) already trained on shard version {version}" in found["skipped"]

    entry = json.loads((work / "models" / "registry.json").read_text())
    del entry["runs"]["same"]["settings"]["gpu_cache"]  # registered before the field existed: its default
    (work / "models" / "registry.json").write_text(json.dumps(entry))
    assert trained_already(str(work), settings)["run"] == "same"
    assert trained_already(str(work), settings.model_copy(update={"gpu_cache": False})) is None

    run("twin", settings)
    assert trained_already(str(work), settings)["run"] == "twin"  # the newest of equals
    promote(work, "same", "ann", "the first")
    assert "the champion same already trained" in trained_already(str(work), settings)["skipped"]
    shutil.rmtree(same / "checkpoints")  # a run that is gone is not a reason to skip
    assert trained_already(str(work), settings)["run"] == "twin"


@pytest.mark.slow
def test_rerun_without_new_data_trains_nothing_and_says_why(
    prefect_api: None, pipeline_config: Path, tmp_path: Path
) -> None:
    from dcgan.registry import load_registry
    from flows.pipeline import pipeline_flow

    config = yaml.safe_load(pipeline_config.read_text())
    work = tmp_path / "work"
    config["work"] = str(work)
    config["evaluate"] = {"swd_images": 32, "guided_images": 8}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    first = pipeline_flow(str(path))
    run = Path(first["train"]["run_dir"])
    assert first["evaluate"] is not None and load_registry(work).champion == run.name

    again = pipeline_flow(str(path))  # nothing new, the same settings
    assert again["train"]["run"] == run.name and again["evaluate"] is None
    assert f"the champion {run.name} already trained on shard version 1" in again["train"]["skipped"]
    assert [p.name for p in (work / "train").iterdir()] == [run.name] and len(load_registry(work).runs) == 1
    report = (work / "report.md").read_text()
    assert "# Training: skipped" in report and "--refresh train" in report and "# Evaluation" not in report
    assert f"its last evaluation: `{work / 'eval' / run.name / 'report.md'}`" in report
    assert "# Shards" in report

    config["evaluate"] = {"enabled": False}
    path.write_text(yaml.safe_dump(config))
    forced = runner.invoke(app, ["run", "--config", str(path), "--refresh", "train"])
    assert forced.exit_code == 0, forced.output
    assert len(list((work / "train").iterdir())) == 2 and len(load_registry(work).runs) == 2

    config["train"]["steps"] = 5  # other settings: a new run
    path.write_text(yaml.safe_dump(config))
    changed = pipeline_flow(str(path))
    assert "skipped" not in changed["train"] and changed["train"]["steps"] == 5
    assert len(load_registry(work).runs) == 3
    assert pipeline_flow(str(path))["train"]["run"] == Path(changed["train"]["run_dir"]).name  # then skipped again
    assert runner.invoke(app, ["run", "--config", str(path), "--refresh", "nothing"]).exit_code == 2
