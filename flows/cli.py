"""`dcgan-pipeline` command line: each subcommand runs its Prefect flow (no server needed).

Without PREFECT_API_URL, Prefect runs flows against a temporary local API; with it, runs
show up on that server like deployment runs do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dcgan.checkpoint import CheckpointError
from dcgan.data import DataError
from dcgan.evaluation.cifar import EvaluationError
from dcgan.train import TrainingDiverged
from dedup.autoencoder import AutoencoderError
from preprocessing.lsun import LsunError
from preprocessing.sharding import ShardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

USER_ERRORS = (
    EvaluationError,
    AutoencoderError,
    LsunError,
    ShardError,
    DataError,
    CheckpointError,
    TrainingDiverged,
    ValueError,
    FileNotFoundError,
)

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


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    """Run a flow; turn known user errors into one clear line and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    raise ValueError(message)


@app.command()
def demo(
    work: Annotated[Path, typer.Option(help="work directory")] = Path("work/demo"),
    steps: Annotated[int, typer.Option(help="training steps (about 0.6 s each on 2 CPU cores)")] = 200,
    records: Annotated[int, typer.Option(help="demo LMDB records")] = 3000,
) -> None:
    """Whole pipeline on the embedded demo data: build LMDB, extract, shard, train, report."""
    from flows.pipeline import pipeline_flow

    work.mkdir(parents=True, exist_ok=True)
    config = work / "demo.yaml"
    config.write_text(DEMO_CONFIG.format(work=work, records=records, steps=steps))
    result = _run(pipeline_flow, str(config))
    train = result["train"]
    typer.secho("\nDemo finished.", fg="green", bold=True)
    typer.echo(f"  samples:    {train['samples']}")
    typer.echo(f"  checkpoint: {train['checkpoint']}")
    typer.echo(f"  metrics:    {Path(train['run_dir']) / 'metrics.jsonl'}")
    typer.echo(f"  report:     {result['report']}")


@app.command()
def lsun(
    db: Annotated[list[Path], typer.Option(help="LSUN <category>_<split>_lmdb directory; repeatable")],
    work: Annotated[Path, typer.Option(help="work directory")],
    size: Annotated[int, typer.Option(help="output crop size in pixels")] = 64,
    part_size: Annotated[int, typer.Option(help="records per partition (one task each)")] = 10_000,
    refresh: Annotated[bool, typer.Option(help="discard earlier extraction of these sources")] = False,
) -> None:
    """Extract center crops from LSUN LMDBs into WORK/extract/<source>/."""
    from flows.lsun import lsun_extract_flow
    from preprocessing.lsun import resolve_db

    for path in db:  # fail before a Prefect API is even started
        _run(resolve_db, path)
    if not 8 <= size <= 1024 or part_size < 1:
        _run(_fail, f"need 8 <= size <= 1024 and part_size >= 1, got {size} and {part_size}")

    for r in _run(lsun_extract_flow, [str(p) for p in db], str(work), size=size, part_size=part_size, refresh=refresh):
        typer.echo(f"{r['source']}: {r['ok']} ok, {r['total'] - r['ok']} rejected -> {r['out_dir']}")


@app.command()
def faces(
    photos: Annotated[Path, typer.Option(help="folder tree, tar of photos, or Parquet table with key + image")],
    work: Annotated[Path, typer.Option(help="work directory")],
    detector: Annotated[str, typer.Option(help="haar (bundled with OpenCV) or yunet (needs --model)")] = "haar",
    model: Annotated[Path | None, typer.Option(help="YuNet ONNX file (face_detection_yunet_2023mar.onnx)")] = None,
    min_face: Annotated[int, typer.Option(help="keep faces whose box short side is at least this (source px)")] = 64,
    size: Annotated[int, typer.Option(help="output crop size in pixels")] = 64,
    margin: Annotated[float, typer.Option(help="context added around the box, as a share of its side")] = 0.25,
    name: Annotated[str | None, typer.Option(help="source name (default: faces_<file or folder name>)")] = None,
    part_size: Annotated[int, typer.Option(help="photos per partition (one task each)")] = 1000,
    refresh: Annotated[bool, typer.Option(help="discard an earlier run of this source")] = False,
) -> None:
    """Detect faces in scraped photos and keep square crops of the large ones."""
    from flows.photos import faces_flow
    from preprocessing.faces import DetectorConfig
    from preprocessing.photo_stages import face_settings
    from preprocessing.photos import open_source

    _run(open_source, photos)
    _run(
        face_settings,
        size,
        DetectorConfig(kind=detector, model=str(model) if model else None, min_face=min_face),
        margin,
        1,
    )
    r = _run(
        faces_flow,
        str(photos),
        str(work),
        name=name,
        detector=detector,
        model=str(model) if model else None,
        min_face=min_face,
        size=size,
        margin=margin,
        part_size=part_size,
        refresh=refresh,
    )
    typer.echo(f"{r['source']}: {r['photos']} photos -> {r['ok']} face crops -> {r['out_dir']}")


@app.command()
def ingest(
    images: Annotated[Path, typer.Option(help="folder tree (class subfolders) or Parquet table with key + image")],
    work: Annotated[Path, typer.Option(help="work directory")],
    size: Annotated[int, typer.Option(help="output crop size in pixels")] = 32,
    name: Annotated[str | None, typer.Option(help="source name (default: images_<file or folder name>)")] = None,
    part_size: Annotated[int, typer.Option(help="images per partition (one task each)")] = 5000,
    refresh: Annotated[bool, typer.Option(help="discard an earlier run of this source")] = False,
) -> None:
    """Min-resize and center-crop an image folder or table (ImageNet-style, 32 px)."""
    from flows.photos import ingest_flow
    from preprocessing.photo_stages import ingest_settings
    from preprocessing.photos import open_source

    _run(open_source, images)
    _run(ingest_settings, size, 1)
    r = _run(ingest_flow, str(images), str(work), name=name, size=size, part_size=part_size, refresh=refresh)
    typer.echo(f"{r['source']}: {r['photos']} images -> {r['ok']} crops -> {r['out_dir']}")


@app.command()
def dedup(
    work: Annotated[Path, typer.Option(help="work directory")],
    radius: Annotated[int, typer.Option(help="Hamming radius: 0 = identical codes (the paper)")] = 0,
    autoencoder: Annotated[Path | None, typer.Option(help="trained autoencoder.pt to use instead of training")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda, for training the autoencoder")] = "cpu",
    max_epochs: Annotated[int, typer.Option(help="autoencoder epochs at most (stops earlier on a plateau)")] = 50,
    refresh: Annotated[bool, typer.Option(help="recollect, retrain and rehash")] = False,
) -> None:
    """Flag near duplicates across every extracted source with the paper's autoencoder hash."""
    from dcgan.train import resolve_device
    from flows.dedup import dedup_flow
    from preprocessing.sharding import extracted_sources

    if not extracted_sources(work):
        _run(_fail, f"no extracted data under {work / 'extract'}: run an extraction stage first")
    if not 0 <= radius < 64:
        _run(_fail, f"radius must be between 0 and 63, got {radius}")
    _run(resolve_device, device)
    r = _run(
        dedup_flow,
        str(work),
        radius=radius,
        autoencoder=str(autoencoder) if autoencoder else None,
        device=device,
        max_epochs=max_epochs,
        refresh=refresh,
    )
    typer.echo(
        f"{r['items']} items in {r['groups']} groups: {r['removed']} near duplicates flagged "
        f"(report: {work / 'dedup' / 'report.md'})"
    )


@app.command()
def shard(
    work: Annotated[Path, typer.Option(help="work directory")],
    maxcount: Annotated[int, typer.Option(help="samples per shard")] = 10_000,
    maxsize: Annotated[int, typer.Option(help="bytes per shard")] = 1 << 30,
    seed: Annotated[int, typer.Option(help="shuffle seed")] = 0,
) -> None:
    """Write the final shuffled WebDataset shards to WORK/shards/."""
    from flows.shard import shard_flow

    r = _run(shard_flow, str(work), maxcount, maxsize, seed)
    typer.echo(f"{r['total']} samples in {r['count']} shards -> {r['shards']}")


@app.command()
def train(
    work: Annotated[Path, typer.Option(help="work directory")],
    steps: Annotated[int, typer.Option(help="total training steps")] = 1000,
    resolution: Annotated[int, typer.Option(help="32, 64 or 128; must match the shards")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate (a new value on --resume wins)")] = 2e-4,
    run: Annotated[str | None, typer.Option(help="run name under WORK/train (default: new timestamp)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the named (or newest) run from its checkpoint")] = False,
    discriminator: Annotated[str, typer.Option(help="dcgan, or imagenet32 (the paper's 32 px CIFAR-10 D)")] = "dcgan",
    loop: Annotated[str, typer.Option(help="fast, or textbook (pytorch/examples' eager fp32 loop)")] = "fast",
    precision: Annotated[str, typer.Option(help="bf16 autocast on CUDA, or fp32")] = "bf16",
    channels_last: Annotated[bool, typer.Option(help="channels_last layout on CUDA")] = True,
    fused_adam: Annotated[bool, typer.Option(help="fused Adam on CUDA")] = True,
    cuda_graphs: Annotated[bool, typer.Option(help="capture the whole step as a CUDA graph")] = True,
    gpu_cache: Annotated[bool, typer.Option(help="decoded images in GPU memory when they fit --cache-gb")] = True,
    cache_gb: Annotated[float, typer.Option(help="decoded-cache budget in GiB; above it, stream the shards")] = 8.0,
    best_images: Annotated[int, typer.Option(help="SWD samples per checkpoint to keep best.pt (0: off)")] = 512,
    on_nan: Annotated[str, typer.Option(help="rollback (to the last checkpoint, halving lr) or stop")] = "rollback",
    tensorboard: Annotated[bool, typer.Option(help="write TensorBoard events to RUN/tensorboard")] = True,
    nproc_per_node: Annotated[int, typer.Option(help="data-parallel processes under torchrun (one per GPU)")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 500,
    sample_every: Annotated[int, typer.Option(help="steps between sample grids")] = 500,
    log_every: Annotated[int, typer.Option(help="steps between metric lines")] = 50,
) -> None:
    """Train a DCGAN on WORK/shards (a progress bar shows on a terminal)."""
    from dcgan.data import shard_urls
    from dcgan.train import TrainConfig, resolve_device
    from flows.train import train_flow

    options = dict(
        steps=steps,
        resolution=resolution,
        batch_size=batch_size,
        device=device,
        lr=lr,
        discriminator=discriminator,
        loop=loop,
        precision=precision,
        channels_last=channels_last,
        fused_adam=fused_adam,
        cuda_graphs=cuda_graphs,
        gpu_cache=gpu_cache,
        best_images=best_images,
        on_nan=on_nan,
        tensorboard=tensorboard,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every,
        log_every=log_every,
    )
    _run(TrainConfig("", "", **options).validate)
    _run(resolve_device, device)
    _run(shard_urls, work / "shards", resolution)
    if nproc_per_node < 1:
        _run(_fail, f"--nproc-per-node must be >= 1, got {nproc_per_node}")

    r = _run(
        train_flow, str(work), run=run, resume=resume, cache_gb=cache_gb, nproc_per_node=nproc_per_node, **options
    )
    typer.echo(f"trained to step {r['steps']} on {r['device']} x{r['world_size']} ({r['step_path']})")
    typer.echo(f"  samples:    {r['samples']}")
    typer.echo(f"  checkpoint: {r['checkpoint']}")
    if r.get("best"):
        typer.echo(f"  best:       step {r['best']['step']} (SWD {r['best']['swd']:.1f}), checkpoints/best.pt")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="training run directory (WORK/train/<run>)")],
    checkpoint: Annotated[Path | None, typer.Option(help="a checkpoint of the run (default: its newest)")] = None,
    cifar10: Annotated[Path | None, typer.Option(help="folder with CIFAR-10 train.parquet and test.parquet")] = None,
    svhn: Annotated[Path | None, typer.Option(help="folder with SVHN train_32x32.mat and test_32x32.mat")] = None,
    limit_train: Annotated[int | None, typer.Option(help="CIFAR-10: a seeded subset of the training images")] = None,
    limit_test: Annotated[int | None, typer.Option(help="CIFAR-10: a seeded subset of the test images")] = None,
    svhn_draws: Annotated[int, typer.Option(help="SVHN: draws of the 1000 labelled images")] = 10,
    swd_images: Annotated[int, typer.Option(help="generated and training images for SWD, FID and KID")] = 2048,
    inception: Annotated[
        Path | None,
        typer.Option(
            help="local Inception-v3 weights for FID/KID, never downloaded: pytorch-fid's "
            "pt_inception-2015-12-05-*.pth (the FID network) or torchvision's inception_v3_google-*.pth"
        ),
    ] = None,
    arithmetic: Annotated[
        str | None,
        typer.Option(help='vector arithmetic concepts as sample-sheet indices, e.g. "A=1,5,9;B=2,3,4;C=7,8,11"'),
    ] = None,
    expression: Annotated[str | None, typer.Option(help='concepts joined by + and -, e.g. "A-B+C"')] = None,
    boxes: Annotated[
        Path | None,
        typer.Option(
            help='feature-map removal: JSON {"samples": [{"index": i, "boxes": [[x0, y0, x1, y1], ...]}, ...]} '
            "with boxes in sample-sheet pixel coordinates"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda, for feature extraction")] = "cpu",
) -> None:
    """Sample quality, visualisations, and the paper's CIFAR-10 and SVHN protocols on a run's checkpoint.

    Every evaluation writes a numbered sample sheet (eval/<run>/figures/sample_sheet.png): pick
    --arithmetic exemplars and draw --boxes on it, then evaluate again.
    """
    from dcgan.evaluation.inputs import check_inputs
    from dcgan.train import resolve_device
    from flows.evaluate import evaluate_flow

    _run(resolve_device, device)
    given = {"checkpoint": checkpoint, "cifar10": cifar10, "svhn": svhn, "inception": inception, "boxes": boxes}
    _run(check_inputs, run, arithmetic=arithmetic, expression=expression, **given)
    r = _run(
        evaluate_flow,
        str(run),
        limit_train=limit_train,
        limit_test=limit_test,
        svhn_draws=svhn_draws,
        swd_images=swd_images,
        device=device,
        arithmetic=arithmetic,
        expression=expression,
        **{k: str(v) if v else None for k, v in given.items()},
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


@app.command("run")
def run_config(
    config: Annotated[Path, typer.Option(help="pipeline YAML (see configs/)")],
    refresh: Annotated[
        list[str] | None, typer.Option(help="stage to redo: extract, dedup or shard; repeatable")
    ] = None,
) -> None:
    """The full DAG from a YAML config."""
    from flows.pipeline import load_config, pipeline_flow

    _run(load_config, config)

    r = _run(pipeline_flow, str(config), refresh=refresh or [])
    typer.echo(f"report: {r['report']}")


def main() -> None:
    app(prog_name="dcgan-pipeline")


if __name__ == "__main__":
    sys.exit(main())
