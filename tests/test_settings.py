"""Settings declared once: every field of every stage model reaches the domain code from the CLI and the YAML.

The values are generated from the models themselves (a non-default value per field), so a new
field is covered without touching this file; a field no value can be generated for fails here
until it declares `examples=[...]`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from dcgan.settings import EvaluateSettings, TrainSettings
from dedup.settings import DedupSettings
from flows.cli import app
from preprocessing.errors import UserError
from preprocessing.settings import FacesSettings, IngestSettings, LsunSettings, ShardSettings

STAGE_MODELS = (
    LsunSettings,
    FacesSettings,
    IngestSettings,
    DedupSettings,
    ShardSettings,
    TrainSettings,
    EvaluateSettings,
)


class Reached(UserError):
    """Raised by a probe at the domain boundary: the flow got this far with these settings."""


def _bounds_ok(value: float, metadata: list) -> bool:
    for m in metadata:
        if (
            (isinstance(m, at.Ge) and value < m.ge)
            or (isinstance(m, at.Gt) and value <= m.gt)
            or (isinstance(m, at.Le) and value > m.le)
            or (isinstance(m, at.Lt) and value >= m.lt)
        ):
            return False
    return True


def sample_value(name: str, field: Any, tmp: Path) -> Any:
    """A valid value other than the default, from the field's own declaration."""
    other = [e for e in field.examples or [] if e != field.default]
    if other:
        return other[0]
    kind = (field.json_schema_extra or {}).get("path")
    if kind == "file":
        (tmp / f"{name}.bin").write_bytes(b"x")
        return str(tmp / f"{name}.bin")
    if kind == "dir":
        (tmp / name).mkdir(exist_ok=True)
        return str(tmp / name)
    ann, default = field.annotation, field.default
    if ann is bool:
        return not default
    if get_origin(ann) is Literal:
        return next(v for v in get_args(ann) if v != default)
    if ann in (int, float):
        step = 1 if ann is int else (default / 2 if default else 0.5)
        for value in (default + step, default - step):
            if _bounds_ok(value, field.metadata):
                return value
    pytest.fail(f"cannot generate a value for {name} ({ann}): declare examples=[...] on the field")


def samples(model: type[BaseModel], tmp: Path) -> dict[str, Any]:
    values = {n: sample_value(n, f, tmp) for n, f in model.model_fields.items()}
    model.model_validate(values)  # all at once must be valid too
    assert all(values[n] != f.default for n, f in model.model_fields.items())
    return values


def cli_args(values: dict[str, Any]) -> list[str]:
    args = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        args += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return args


def assert_reached(captured: list, model: type[BaseModel], values: dict[str, Any]) -> None:
    assert captured, f"{model.__name__}: the domain code was never reached"
    got = captured[-1]
    for name, value in values.items():
        assert getattr(got, name) == value, (
            f"{model.__name__}.{name}: sent {value!r}, domain got {getattr(got, name)!r}"
        )


def probe(captured: list, position: int) -> Any:
    def fake(*args: Any, **kwargs: Any) -> None:
        captured.append(args[position])
        raise Reached("probe")

    return fake


@pytest.fixture
def inputs(tmp_path: Path, extracted_work: Path, shards_dir: Path, photo_values: list[bytes]) -> dict[str, Path]:
    """Real, small inputs for every stage: an LMDB, a photo folder, an extracted work dir, shards, a run."""
    from preprocessing.lsun import write_lsun_lmdb

    write_lsun_lmdb(tmp_path / "probe_lmdb", photo_values[:4])
    (tmp_path / "photos").mkdir()
    for i, v in enumerate(photo_values[:2]):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(v)
    work = tmp_path / "work"
    shutil.copytree(extracted_work, work)
    shutil.copytree(shards_dir, work / "shards")
    return {"db": tmp_path / "probe_lmdb", "photos": tmp_path / "photos", "work": work}


def test_every_field_reaches_the_domain_from_the_cli(
    prefect_api: None, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.dedup
    import flows.evaluate
    import flows.lsun
    import flows.photos
    import flows.shard
    import flows.train
    import preprocessing.photo_stages

    monkeypatch.setattr(preprocessing.photo_stages, "FaceDetector", lambda cfg: None)  # the model file is a stub
    monkeypatch.setattr("dcgan.evaluation.inputs.check_inputs", lambda *a, **k: None)  # the CLI's early check
    work, run = str(inputs["work"]), str(tmp_path / "run")
    stages = {
        LsunSettings: (["lsun", "--db", str(inputs["db"]), "--work", work], flows.lsun, "prepare_extraction", 2),
        FacesSettings: (["faces", "--photos", str(inputs["photos"]), "--work", work], flows.photos, None, 3),
        IngestSettings: (["ingest", "--images", str(inputs["photos"]), "--work", work], flows.photos, None, 3),
        DedupSettings: (["dedup", "--work", work], flows.dedup, "prepare_autoencoder", 1),
        ShardSettings: (["shard", "--work", work], flows.shard, "build_shards", 1),
        TrainSettings: (["train", "--work", work], flows.train, "run_training", 0),
        EvaluateSettings: (["evaluate", "--run", run], flows.evaluate, "check_inputs", 1),
    }
    assert set(stages) == set(STAGE_MODELS)
    for model, (command, module, target, position) in stages.items():
        captured: list = []
        monkeypatch.setattr(module, target or "prepare_photo_stage", probe(captured, position))
        values = samples(model, tmp_path)
        result = CliRunner().invoke(app, [*command, *cli_args(values)])
        assert result.exit_code == 2 and "probe" in result.output, result.output
        assert_reached(captured, model, values)


def test_every_field_reaches_its_stage_from_the_pipeline_yaml(
    prefect_api: None, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.pipeline
    import preprocessing.photo_stages
    from flows.config import FROM_EXTRACT

    monkeypatch.setattr(preprocessing.photo_stages, "FaceDetector", lambda cfg: None)
    got: dict[str, Any] = {}

    def stage(name: str, result: Any, position: int = 2) -> Any:
        def fake(*args: Any, **kwargs: Any) -> Any:
            got[name] = args[position] if len(args) > position else kwargs["settings"]
            return result

        return fake

    run_dir = str(tmp_path / "train" / "r")
    monkeypatch.setattr(flows.pipeline, "lsun_extract_flow", stage("lsun", [{"source": "a"}]))
    monkeypatch.setattr(flows.pipeline, "faces_flow", stage("faces", {"source": "b"}))
    monkeypatch.setattr(flows.pipeline, "ingest_flow", stage("ingest", {"source": "c"}))
    monkeypatch.setattr(flows.pipeline, "dedup_flow", stage("dedup", None, 1))
    monkeypatch.setattr(flows.pipeline, "shard_flow", stage("shard", None, 1))
    monkeypatch.setattr(flows.pipeline, "train_flow", stage("train", {"run_dir": run_dir}, 1))
    monkeypatch.setattr(flows.pipeline, "evaluate_flow", stage("evaluate", None, 1))
    monkeypatch.setattr(flows.pipeline, "write_pipeline_report", lambda work, names: "report.md")

    extract = samples(LsunSettings, tmp_path)
    faces = {k: v for k, v in samples(FacesSettings, tmp_path).items() if k not in FROM_EXTRACT}
    ingest = {k: v for k, v in samples(IngestSettings, tmp_path).items() if k not in FROM_EXTRACT}
    train = samples(TrainSettings, tmp_path)
    assert train["resolution"] == extract["size"]  # one size: the pipeline trains at extract.size
    config = {
        "work": str(tmp_path / "w"),
        "sources": [
            {"type": "lsun", "db": str(inputs["db"])},
            {"type": "faces", "photos": str(inputs["photos"]), **faces},
            {"type": "images", "images": str(inputs["photos"]), **ingest},
        ],
        "extract": extract,
        "dedup": samples(DedupSettings, tmp_path),
        "shard": samples(ShardSettings, tmp_path),
        "train": {k: v for k, v in train.items() if k != "resolution"},
        "evaluate": samples(EvaluateSettings, tmp_path),
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    flows.pipeline.pipeline_flow(str(path))
    shared = {k: extract[k] for k in FROM_EXTRACT}
    expected = {
        "lsun": (LsunSettings, extract),
        "faces": (FacesSettings, {**faces, **shared}),
        "ingest": (IngestSettings, {**ingest, **shared}),
        "dedup": (DedupSettings, config["dedup"]),
        "shard": (ShardSettings, {**config["shard"], "dedup": False}),
        "train": (TrainSettings, train),
        "evaluate": (EvaluateSettings, config["evaluate"]),
    }
    assert {m for m, _ in expected.values()} == set(STAGE_MODELS)
    for name, (model, values) in expected.items():
        assert type(got[name]) is model, f"{name} got a {type(got[name]).__name__}"
        assert_reached([got[name]], model, values)


@pytest.mark.parametrize(
    ("train", "field"),
    [
        ("{best_images: 1}", "train.best_images"),
        ("{device: gpu}", "train.device"),
        ("{discriminator: imagenet32}", "train.discriminator"),
    ],
)
def test_bad_train_section_fails_before_anything_is_written(tmp_path: Path, train: str, field: str) -> None:
    import subprocess
    import sys
    import time

    config = tmp_path / "bad.yaml"
    work = tmp_path / "work"
    config.write_text(f"work: {work}\nsources: [{{type: demo, records: 10}}]\nextract: {{size: 64}}\ntrain: {train}\n")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 10
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"{field}:" in lines[0], proc.stderr
    assert not work.exists()


def test_the_pipeline_evaluates_on_the_machine_s_best_device(
    prefect_api: None, inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` reaches the evaluation (not `cpu` derived from train.device), and means CUDA where CUDA exists."""
    import torch

    import flows.pipeline
    from dcgan.train import resolve_device

    got: dict[str, Any] = {}
    monkeypatch.setattr(flows.pipeline, "lsun_extract_flow", lambda *a, **k: [{"source": "a"}])
    monkeypatch.setattr(flows.pipeline, "dedup_flow", lambda *a, **k: None)
    monkeypatch.setattr(flows.pipeline, "shard_flow", lambda *a, **k: None)
    monkeypatch.setattr(flows.pipeline, "train_flow", lambda *a, **k: {"run_dir": str(tmp_path / "train" / "r")})
    monkeypatch.setattr(flows.pipeline, "evaluate_flow", lambda run, settings: got.setdefault("evaluate", settings))
    monkeypatch.setattr(flows.pipeline, "write_pipeline_report", lambda work, names: "report.md")
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump({"work": str(tmp_path / "w"), "sources": [{"type": "lsun", "db": str(inputs["db"])}]})
    )
    flows.pipeline.pipeline_flow(str(path))
    assert got["evaluate"].device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert resolve_device(got["evaluate"].device).type == "cuda"


@pytest.mark.slow
def test_dedup_disabled_keeps_its_files_and_the_report_holds_only_this_run(prefect_api: None, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.pipeline import pipeline_flow

    work = tmp_path / "work"
    (work / "dedup").mkdir(parents=True)
    (work / "dedup" / "autoencoder.pt").write_bytes(b"a trained hash")
    stale = pa.table({"key": ["x"], "source": ["demo"], "keep": [False]})
    pq.write_table(stale, work / "dedup" / "codes.parquet")  # stale flags: would fail sharding if honoured
    (work / "reports").mkdir()
    (work / "reports" / "extract-removed-source.md").write_text("# gone source\n")
    (work / "reports" / "train-old-run.md").write_text("# old training\n")
    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "work": str(work),
                "sources": [{"type": "demo", "records": 40}],
                "extract": {"size": 32},
                "dedup": {"enabled": False},
                "train": {"enabled": False},
            }
        )
    )
    result = pipeline_flow(str(config))
    assert (work / "dedup" / "autoencoder.pt").read_bytes() == b"a trained hash"
    assert pq.read_table(work / "dedup" / "codes.parquet").equals(stale)
    status = pq.read_table(work / "extract" / "demo" / "manifest.parquet")["status"].to_pylist()
    assert result["shards"]["total"] == status.count("ok")  # every ok item: the keep flags were ignored, not applied
    report = Path(result["report"]).read_text()
    assert "gone source" not in report and "old training" not in report
    assert "LSUN extraction: demo" in report and "# Shards" in report


def test_only_user_errors_exit_2_and_bugs_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.shard

    def bug(*args: Any, **kwargs: Any) -> None:
        raise ValueError("an internal bug, not the user's")

    monkeypatch.setattr(flows.shard, "shard_flow", bug)
    result = CliRunner().invoke(app, ["shard", "--work", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError) and "error:" not in result.output

    def user(*args: Any, **kwargs: Any) -> None:
        raise UserError("the user's mistake")

    monkeypatch.setattr(flows.shard, "shard_flow", user)
    result = CliRunner().invoke(app, ["shard", "--work", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip() == "error: the user's mistake"
