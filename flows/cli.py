"""`dcgan-pipeline` command line: each subcommand runs its Prefect flow (no server needed).

Without PREFECT_API_URL, Prefect runs flows against a temporary local API; with it, runs
show up on that server like deployment runs do. Every stage option comes from that stage's
settings model (`preprocessing.settings`, `dedup.settings`, `dcgan.settings`). A problem of
the user's making (any `UserError`) prints one `error:` line and exits 2 before anything is
written; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dcgan.settings import EvaluateSettings, RetrainSettings, TrainSettings
from dedup.settings import DedupSettings
from flows.options import with_settings
from preprocessing.errors import UserError
from preprocessing.locks import LockSettings
from preprocessing.settings import (
    FacesSettings,
    IngestSettings,
    LsunSettings,
    RunnerSettings,
    ShardSettings,
    parse_settings,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DEMO_CONFIG = """\
# The embedded demo: photos shipped inside scikit-image, cut into an LSUN-format LMDB.
work: {work}
sources:
  - type: demo
    records: {records}
extract:
  size: 32
  part_size: 1000
dedup:
  max_epochs: 10
shard:
  maxcount: 1000
train:
  steps: {steps}
  batch_size: 128
  sample_every: 50
  checkpoint_every: 100
  log_every: 10
"""

Work = Annotated[Path, typer.Option(help="work directory")]
Refresh = Annotated[bool, typer.Option(help="discard an earlier run of this stage and redo it")]
Dask = Annotated[
    str | None, typer.Option("--dask", help="run the parts on the Dask cluster at this scheduler (tcp://HOST:8786)")
]
DaskWorkers = Annotated[
    int | None, typer.Option("--dask-workers", help="run the parts on a temporary local Dask cluster of N workers")
]


def runner_from(dask: str | None, dask_workers: int | None) -> RunnerSettings:
    """--dask / --dask-workers as RunnerSettings (neither: the local process pool)."""
    if dask is None and dask_workers is None:
        return RunnerSettings()
    return parse_settings(RunnerSettings, {"type": "dask", "address": dask, "workers": dask_workers}, "runner")


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Map exactly the user's errors to one `error:` line and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def demo(
    work: Work = Path("work/demo"),
    steps: Annotated[int, typer.Option(help="training steps (about 0.2 s each on 2 CPU cores with bfloat16)")] = 400,
    records: Annotated[int, typer.Option(help="demo LMDB records of the first batch")] = 3000,
    grow: Annotated[int, typer.Option(help="records of the second batch (0: no second batch)")] = 600,
) -> None:
    """Whole pipeline on the embedded demo data; then a second batch arrives, alone processed, and a retrain decides.

    1. Build the demo LMDB, extract, dedup, shard, train (the first champion), evaluate, report.
    2. Add `grow` records to the LMDB and rerun the pipeline without training: extraction,
       dedup and sharding take in the new records only (a new shard version).
    3. Retrain: a challenger on the grown shards, promoted only if it beats the champion.
    """
    import yaml

    from flows.config import load_config
    from flows.pipeline import check_pipeline, pipeline_flow
    from flows.reports import frozen_report, stage_markdown, write_combined_report
    from flows.retrain import retrain_flow

    work.mkdir(parents=True, exist_ok=True)
    config = work / "demo.yaml"
    config.write_text(DEMO_CONFIG.format(work=work, records=records, steps=steps))
    check_pipeline(load_config(config), [])
    result = pipeline_flow(str(config))
    train = result["train"]
    typer.secho("\nDemo, first batch: done.", fg="green", bold=True)
    typer.echo(f"  samples:    {train['samples']}")
    typer.echo(f"  checkpoint: {train['checkpoint']}")
    typer.echo(f"  metrics:    {Path(train['run_dir']) / 'metrics.jsonl'}")
    if grow < 1:
        typer.echo(f"  report:     {result['report']}")
        return
    first = frozen_report(work, "first-batch")  # the second batch rewrites the stage reports
    second = yaml.safe_load(config.read_text())
    second["sources"][0]["records"] = records + grow
    second["train"]["enabled"] = False
    grown = work / "demo-grown.yaml"
    grown.write_text(yaml.safe_dump(second, sort_keys=False))
    again = pipeline_flow(str(grown))
    new = sum(r.get("new", 0) for r in again["extract"])
    typer.secho(f"\nDemo, second batch of {grow} records: done.", fg="green", bold=True)
    typer.echo(f"  extracted:  {new} new records only")
    typer.echo(
        f"  dedup:      {again['dedup']['new_items']} new items, {again['dedup']['duplicates_of_existing']} "
        f"duplicates of kept ones, {again['dedup']['duplicates_among_new']} among themselves"
    )
    shards = again["shards"]
    typer.echo(f"  shards:     version {shards['version']}, {shards['added']} samples added ({shards['total']} in all)")
    second_md = frozen_report(work, "second-batch")
    decision = retrain_flow(str(work), RetrainSettings())
    typer.echo(f"  retrain:    {decision['decision']}: {decision['reason']}")
    report = write_combined_report(
        work,
        "Demo report",
        [
            (f"First batch: {records} records, extracted, deduplicated, sharded, trained, evaluated", first),
            (f"Second batch: {grow} more records, taken in alone (no training)", second_md),
            ("Retrain: a challenger on the grown shards against the champion", stage_markdown(work, "retrain")),
        ],
    )
    typer.echo(f"  report:     {report} (both batches, the training, the evaluation and the retrain)")
    typer.echo(f"  models:     dcgan-pipeline models --work {work}")


@app.command()
@user_errors
@with_settings(LsunSettings, "LSUN settings")
@with_settings(LockSettings, "lock settings", param="lock")
def lsun(
    db: Annotated[list[Path], typer.Option(help="LSUN <category>_<split>_lmdb directory; repeatable")],
    work: Work,
    settings: LsunSettings,
    lock: LockSettings,
    name: Annotated[list[str] | None, typer.Option(help="source name per --db (default: directory name)")] = None,
    refresh: Refresh = False,
    dask: Dask = None,
    dask_workers: DaskWorkers = None,
) -> None:
    """Extract center crops from LSUN LMDBs into WORK/extract/<source>/."""
    from flows.lsun import check_lsun, lsun_extract_flow
    from flows.runners import check_runner

    dbs = [str(p) for p in db]
    check_lsun(dbs, name)  # fail before a Prefect API is even started
    runner = runner_from(dask, dask_workers)
    check_runner(runner, dbs, work)
    for r in lsun_extract_flow(dbs, str(work), settings, names=name, refresh=refresh, runner=runner, lock=lock):
        typer.echo(f"{r['source']}: {r['ok']} ok, {r['total'] - r['ok']} rejected -> {r['out_dir']}")


@app.command()
@user_errors
@with_settings(FacesSettings, "faces settings")
@with_settings(LockSettings, "lock settings", param="lock")
def faces(
    photos: Annotated[Path, typer.Option(help="folder tree, tar of photos, or Parquet table with key + image")],
    work: Work,
    settings: FacesSettings,
    lock: LockSettings,
    name: Annotated[str | None, typer.Option(help="source name (default: faces_<file or folder name>)")] = None,
    refresh: Refresh = False,
    dask: Dask = None,
    dask_workers: DaskWorkers = None,
) -> None:
    """Detect faces in scraped photos and keep square crops of the large ones."""
    from flows.photos import faces_flow
    from flows.runners import check_runner
    from preprocessing.photo_stages import face_plan
    from preprocessing.photos import open_source

    open_source(photos)
    face_plan(settings)  # the detector and its model file load
    runner = runner_from(dask, dask_workers)
    check_runner(runner, [photos, *([settings.model] if settings.model else [])], work)  # before any Prefect API
    r = faces_flow(str(photos), str(work), settings, name=name, refresh=refresh, runner=runner, lock=lock)
    typer.echo(f"{r['source']}: {r['photos']} photos -> {r['ok']} face crops -> {r['out_dir']}")


@app.command()
@user_errors
@with_settings(IngestSettings, "ingest settings")
@with_settings(LockSettings, "lock settings", param="lock")
def ingest(
    images: Annotated[Path, typer.Option(help="folder tree (class subfolders) or Parquet table with key + image")],
    work: Work,
    settings: IngestSettings,
    lock: LockSettings,
    name: Annotated[str | None, typer.Option(help="source name (default: images_<file or folder name>)")] = None,
    refresh: Refresh = False,
    dask: Dask = None,
    dask_workers: DaskWorkers = None,
) -> None:
    """Min-resize and center-crop an image folder or table (ImageNet-style, 32 px)."""
    from flows.photos import ingest_flow
    from flows.runners import check_runner
    from preprocessing.photos import open_source

    open_source(images)
    runner = runner_from(dask, dask_workers)
    check_runner(runner, [images], work)  # before any Prefect API
    r = ingest_flow(str(images), str(work), settings, name=name, refresh=refresh, runner=runner, lock=lock)
    typer.echo(f"{r['source']}: {r['photos']} images -> {r['ok']} crops -> {r['out_dir']}")


@app.command()
@user_errors
@with_settings(DedupSettings, "dedup settings")
@with_settings(LockSettings, "lock settings", param="lock")
def dedup(work: Work, settings: DedupSettings, lock: LockSettings, refresh: Refresh = False) -> None:
    """Flag near duplicates across every extracted source with the paper's autoencoder hash."""
    from flows.dedup import check_dedup, dedup_flow

    check_dedup(str(work), settings)
    r = dedup_flow(str(work), settings, refresh=refresh, lock=lock)
    typer.echo(
        f"{r['items']} items in {r['groups']} groups: {r['removed']} near duplicates flagged "
        f"(report: {work / 'dedup' / 'report.md'})"
    )


@app.command()
@user_errors
@with_settings(ShardSettings, "shard settings")
@with_settings(LockSettings, "lock settings", param="lock")
def shard(work: Work, settings: ShardSettings, lock: LockSettings, refresh: Refresh = False) -> None:
    """Write the final shuffled WebDataset shards to WORK/shards/."""
    from flows.shard import shard_flow

    r = shard_flow(str(work), settings, refresh=refresh, lock=lock)
    typer.echo(f"{r['total']} samples in {r['count']} shards -> {r['shards']}")


@app.command()
@user_errors
@with_settings(TrainSettings, "training settings")
@with_settings(LockSettings, "lock settings", param="lock")
def train(
    work: Work,
    settings: TrainSettings,
    lock: LockSettings,
    run: Annotated[str | None, typer.Option(help="run name under WORK/train (default: new timestamp)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the named (or newest) run from its checkpoint")] = False,
) -> None:
    """Train a DCGAN on WORK/shards (a progress bar shows on a terminal)."""
    from flows.train import check_train, train_flow

    check_train(str(work), settings)
    r = train_flow(str(work), settings, run=run, resume=resume, lock=lock)
    typer.echo(f"trained to step {r['steps']} on {r['device']} x{r['world_size']} ({r['step_path']})")
    typer.echo(f"  samples:    {r['samples']}")
    typer.echo(f"  checkpoint: {r['checkpoint']}")
    if r.get("best"):
        typer.echo(f"  best:       step {r['best']['step']} (SWD {r['best']['swd']:.1f}), checkpoints/best.pt")


@app.command()
@user_errors
@with_settings(EvaluateSettings, "evaluation settings")
def evaluate(
    run: Annotated[Path, typer.Option(help="training run directory (WORK/train/<run>)")],
    settings: EvaluateSettings,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="a checkpoint of the run (default: its newest); an earlier one writes eval/<run>@<stem>"),
    ] = None,
    boxes: Annotated[
        Path | None,
        typer.Option(
            help='feature-map removal: JSON {"samples": [{"index": i, "boxes": [[x0, y0, x1, y1], ...]}, ...]} '
            "with boxes in sample-sheet pixel coordinates"
        ),
    ] = None,
) -> None:
    """Sample quality, visualisations, and the paper's CIFAR-10 and SVHN protocols on a run's checkpoint.

    Every evaluation writes a numbered sample sheet (eval/<run>/figures/sample_sheet.png): pick
    --arithmetic exemplars and draw --boxes on it, then evaluate again.
    """
    from dcgan.evaluation.inputs import check_inputs
    from dcgan.train import resolve_device
    from flows.evaluate import evaluate_flow

    resolve_device(settings.device)
    check_inputs(run, settings, checkpoint=checkpoint, boxes=boxes)
    r = evaluate_flow(
        str(run), settings, checkpoint=str(checkpoint) if checkpoint else None, boxes=str(boxes) if boxes else None
    )
    typer.echo(f"sample sheet: {r['eval_dir']}/{r['sample_sheet']['figure']} (z's: {r['sample_sheet']['z']})")
    if "fid" in r:
        kid = r["fid"]["kid"]
        typer.echo(f"FID {r['fid']['fid']:.2f}, KID x 1e3 {kid['mean'] * 1e3:.2f} ({r['fid']['network']})")
    if "feature_removal" in r:
        typer.echo(f"feature removal: dropped {r['feature_removal']['maps_dropped']} feature maps")
    for name, res in r.get("cifar10", {}).items():
        typer.echo(f"CIFAR-10 {name}: {res['test_accuracy'] * 100:.2f}% test accuracy ({res['feature_dim']}-d)")
    if "svhn" in r:
        typer.echo(
            f"SVHN: {r['svhn']['test_error_mean'] * 100:.2f}% +- {r['svhn']['test_error_std'] * 100:.2f}% test error"
        )
    typer.echo(f"report: {r['eval_dir']}/report.md")


@app.command()
@user_errors
@with_settings(RetrainSettings, "retrain settings")
@with_settings(LockSettings, "lock settings", param="lock")
def retrain(
    work: Work,
    settings: RetrainSettings,
    lock: LockSettings,
    force: Annotated[bool, typer.Option(help="train a challenger even if the champion saw these shards")] = False,
) -> None:
    """Train a challenger on grown shards; promote it only if it beats the champion on the fixed protocol.

    Options not given are the champion's training settings (or the newest registered run's).
    """
    from flows.retrain import retrain_flow

    r = retrain_flow(str(work), settings, force=force, lock=lock)
    typer.echo(f"retrain: {r['decision']}: {r['reason']}")


def _run_dir(work: Path, run: str) -> Path:
    """`champion` (the registry's) or a run name -> its directory."""
    from dcgan.registry import RegistryError, load_registry

    registry = load_registry(work)
    if run == "champion":
        if registry.champion is None:
            raise RegistryError(f"{work} has no champion yet: pass --run NAME, or run retrain / models --promote")
        return Path(registry.runs[registry.champion].run_dir)
    path = work / "train" / run
    if not path.is_dir():
        raise RegistryError(f"no run {run!r} under {work / 'train'}")
    return path


RunName = Annotated[str, typer.Option(help="run name under WORK/train, or champion (the registry's)")]


@app.command()
@user_errors
def models(
    work: Work,
    promote: Annotated[str | None, typer.Option(help="make this registered run the champion by hand")] = None,
    who: Annotated[str | None, typer.Option(help="with --promote: who decided")] = None,
    why: Annotated[str | None, typer.Option(help="with --promote: why")] = None,
) -> None:
    """The model registry: every registered run with its dataset version and metrics, the champion marked."""
    import getpass

    from dcgan.registry import load_registry, metric_text
    from dcgan.registry import promote as promote_run

    if promote is not None:
        promote_run(work, promote, who or getpass.getuser(), why or "")
    registry = load_registry(work)
    if not registry.runs:
        typer.echo(f"no registered runs in {work / 'models' / 'registry.json'}")
        return
    typer.echo(f"{'':2}{'run':32} {'data v':>6} {'step':>7} {'swd':>9} {'fid':>8} {'memo':>6}  registered")
    for name, entry in sorted(registry.runs.items(), key=lambda kv: kv[1].registered_at):
        m = entry.metrics
        mark = "* " if name == registry.champion else "  "
        swd, fid, memo = (metric_text(m, k) for k in ("swd", "fid", "memorisation_ratio"))
        typer.echo(
            f"{mark}{name:32} {entry.dataset_version:>6} {m.get('step', 0):>7} {swd:>9} {fid:>8} {memo:>6}  "
            f"{entry.registered_at}"
        )
    typer.echo("* champion" if registry.champion else "no champion yet")


@app.command()
@user_errors
def generate(
    work: Work,
    n: Annotated[int, typer.Option(help="number of samples")],
    out: Annotated[Path, typer.Option(help="a new folder of PNG files, or a .tar (WebDataset) file")],
    run: RunName = "champion",
    seed: Annotated[int, typer.Option(help="seed of the z's")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Write N samples of a run as PNG files or a WebDataset tar: the input of external FID tools."""
    from dcgan.export import generate_samples
    from dcgan.train import resolve_device

    run_dir = _run_dir(work, run)
    r = generate_samples(run_dir, n, out, seed=seed, device=str(resolve_device(device)))
    what = "PNG files in" if r["format"] == "png" else "samples in the WebDataset tar"
    typer.echo(f"Wrote {n} {what} {out}, from {run_dir.name} at step {r['step']} (z seed {seed}).")


@app.command()
@user_errors
def export(
    work: Work,
    fmt: Annotated[str, typer.Option("--format", help="torchscript or onnx")],
    out: Annotated[Path, typer.Option(help="output file")],
    run: RunName = "champion",
) -> None:
    """Export a run's generator, checked against PyTorch on the same z's (to 1e-4)."""
    from dcgan.export import export_generator

    run_dir = _run_dir(work, run)
    r = export_generator(run_dir, fmt, out)
    typer.echo(
        f"Exported the generator of {run_dir.name} (step {r['step']}) as {r['format']} to {r['path']}: it maps "
        f"{r['nz']}-d {r['noise']} z's to {r['resolution']} px images in [-1, 1], and matches PyTorch on the "
        f"same z's to {r['max_abs_diff']:.2g}."
    )


@app.command()
@user_errors
def verify(
    work: Work,
    data: Annotated[bool, typer.Option(help="also read every file whose sha256 was recorded, and compare")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
) -> None:
    """Check that a work directory is whole, changing nothing: one line per problem with the command that repairs it.

    Every Parquet and JSON index parses; every input is in its manifest once, every ok item in
    dedup's codes once, every kept item in the shards once, and samples.parquet agrees with the
    index; every file an index names exists; every registered run's checkpoint loads. With
    --data, the staging tars, shard tars and checkpoints are read and their sha256 compared, and
    every tar's members with its index. Exit status 0: whole; 2: not whole.
    """
    import json

    from flows.verify import verify_work
    from preprocessing.integrity import summary_lines

    found = verify_work(work, data)
    if json_out:
        typer.echo(json.dumps(found.as_dict(), indent=2))
    else:
        for line in summary_lines(found, work, data):
            typer.echo(line)
    if found.problems:
        raise typer.Exit(2)


@app.command("run")
@user_errors
def run_config(
    config: Annotated[Path, typer.Option(help="pipeline YAML (see configs/)")],
    refresh: Annotated[
        list[str] | None, typer.Option(help="stage to redo: extract, dedup, shard or train; repeatable")
    ] = None,
) -> None:
    """The full DAG from a YAML config, validated whole before the first stage runs."""
    from flows.config import load_config

    cfg = load_config(config)  # no Prefect imported yet: a bad config fails in a second or two
    from flows.pipeline import check_pipeline, pipeline_flow

    check_pipeline(cfg, refresh or [])
    r = pipeline_flow(str(config), refresh=refresh or [])
    typer.echo(f"report: {r['report']}")


def main() -> None:
    app(prog_name="dcgan-pipeline")


if __name__ == "__main__":
    sys.exit(main())
