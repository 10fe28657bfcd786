"""Training flow: one DCGAN run on the work directory's shards, with a report at the end."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from dcgan.checkpoint import eval_dir_for, list_checkpoints
from dcgan.data import shard_urls
from dcgan.evaluation.fixed_protocol import fixed_protocol
from dcgan.launch import run_dir_for, run_training
from dcgan.registry import challenge, load_registry, register_run
from dcgan.settings import TrainSettings
from dcgan.train import TrainConfig, resolve_device
from flows.reports import publish
from flows.runtime import stage_lock
from preprocessing.locks import LockSettings, reading_shards
from preprocessing.markdown import table
from preprocessing.sharding import read_index


def check_train(work: str, settings: TrainSettings) -> None:
    """Fail before any work: the device exists here, and the shards hold images at this resolution."""
    resolve_device(settings.device)
    shard_urls(Path(work) / "shards", settings.resolution)


def training_settings(settings: dict) -> dict:
    """The training settings (every `TrainSettings` field) of a registered run's settings, as JSON values.

    A registry entry holds more (the run's paths, a retrain's comparison settings): those do not
    say how the model was trained. A field the entry lacks (registered before the field existed)
    counts as its default.
    """
    return {k: settings.get(k, f.get_default(call_default_factory=True)) for k, f in TrainSettings.model_fields.items()}


def trained_already(work: str, settings: TrainSettings) -> dict | None:
    """A registered run that trained on the current shard version with these training settings, or None.

    Training is a function of the shards and the settings (the seed among them), so such a run
    is what training again would make. Any registered run counts, not only the champion: a run
    that was never promoted (`models`, `retrain` decide) would still be trained again for
    nothing. The champion is named first when it matches; a run whose checkpoints are gone does
    not count.
    """
    registry = load_registry(Path(work))
    shards = Path(work) / "shards"
    if not registry.runs or not (shards / "index.json").is_file():
        return None
    version = read_index(shards)["version"]
    wanted = training_settings(settings.model_dump(mode="json"))
    order = {name: i for i, name in enumerate(registry.runs)}  # breaks ties of registered_at (seconds)

    def rank(name: str) -> tuple:  # the champion, then the newest
        return name == registry.champion, registry.runs[name].registered_at, order[name]

    for name in sorted(registry.runs, key=rank, reverse=True):
        entry = registry.runs[name]
        if entry.dataset_version != version or training_settings(entry.settings) != wanted:
            continue
        ckpts = list_checkpoints(Path(entry.run_dir))
        if not ckpts:
            continue
        samples = sorted((Path(entry.run_dir) / "samples").glob("step-*.png"))
        who = f"the champion {name}" if name == registry.champion else f"run {name} (not the champion)"
        return {
            "skipped": f"{who} already trained on shard version {version} with these training settings",
            "run": name,
            "run_dir": entry.run_dir,
            "checkpoint": str(ckpts[-1]),
            "samples": str(samples[-1]) if samples else None,
            "dataset_version": version,
        }
    return None


@task
def report_skipped_training(work: str, done: dict) -> dict:
    """Say why nothing was trained (log, stage report `training-skipped`); returns `done`."""
    get_run_logger().info("training skipped: %s", done["skipped"])
    run_dir = done["run_dir"]
    evaluation = eval_dir_for(Path(run_dir)) / "report.md"
    md = (
        f"# Training: skipped\n\nNothing trained: {done['skipped']} (`{run_dir}`, checkpoint "
        f"`{Path(done['checkpoint']).name}`). New shards or other training settings train a new run; "
        "`dcgan-pipeline run --refresh train` (the pipeline's parameter `refresh: [train]`) trains one anyway.\n\n"
        f"Evaluation skipped too: `dcgan-pipeline evaluate --run {run_dir}` evaluates that run"
        + (f" (its last evaluation: `{evaluation}`).\n" if evaluation.is_file() else ".\n")
    )
    publish(Path(work), "training-skipped", md)
    return done


@task
def train_dcgan(cfg: TrainConfig, resume: bool) -> dict:
    result = run_training(cfg, resume=resume, log=get_run_logger().info)
    final = result["final"]
    best = result.get("best")
    md = f"# Training: {Path(cfg.run_dir).name}\n\n" + table(
        [
            ("steps", result["steps"]),
            ("images in dataset", result["images"]),
            ("resolution", cfg.resolution),
            ("batch size (per process x processes)", f"{cfg.batch_size} x {result['world_size']}"),
            ("device", result["device"]),
            ("step", result["step_path"]),
            ("seconds", f"{result['seconds']:.0f}"),
            ("NaN rollbacks", result["rollbacks"]),
            ("best checkpoint (lowest SWD)", f"step {best['step']}, SWD {best['swd']:.1f}" if best else "off"),
            *[(k, f"{v:.3g}" if k != "img_per_s" else f"{v:.0f}") for k, v in final.items()],
        ],
        ("", "value"),
    )
    md += f"\nCheckpoint: `{result['checkpoint']}`; TensorBoard: `tensorboard --logdir {cfg.run_dir}/tensorboard`\n"
    image = Path(result["samples"]).read_bytes() if result["samples"] else None
    publish(Path(cfg.shards).parent, f"train-{Path(cfg.run_dir).name}", md, image)
    return result


@task
def register_trained_run(work: str, cfg: TrainConfig) -> dict:
    """Measure the finished run on the fixed protocol and record it in the model registry.

    The first run of a work directory becomes its champion (there is nothing to compare with);
    later ones are registered only: `retrain` or `models --promote` decide.
    """
    run_dir = Path(cfg.run_dir)
    version = read_index(Path(cfg.shards))["version"]
    metrics = fixed_protocol(run_dir, Path(cfg.shards), device=str(resolve_device(cfg.device)))
    register_run(Path(work), run_dir.name, run_dir, version, cfg.model_dump(), metrics)
    if load_registry(Path(work)).champion is None:
        challenge(Path(work), run_dir.name)
    return metrics


@flow(name="train")
def train_flow(
    work: str,
    settings: TrainSettings = TrainSettings(),
    run: str | None = None,
    resume: bool = False,
    add_to_registry: bool = True,
    lock: LockSettings = LockSettings(),
) -> dict:
    """Train a DCGAN on `work/shards` into `work/train/<run>/` (new run, or resume the newest).

    `settings.nproc_per_node` > 1 trains data-parallel under torchrun (one process per GPU;
    batch_size is per process). The fast-path switches apply on CUDA; `loop=textbook` is pytorch/examples'.
    With `add_to_registry` the finished run is measured on the fixed protocol and recorded in
    `work/models/registry.json` (the first becomes the champion; then `retrain` or `models --promote` decide).
    The run is written under its lock (a second `--resume` of it waits), and the shards are
    read under the readers lock, so a shard rebuild waits until training ends.
    """
    check_train(work, settings)
    run_dir = run_dir_for(work, run, resume)
    cfg = TrainConfig(**settings.model_dump(), shards=str(Path(work) / "shards"), run_dir=str(run_dir))
    with stage_lock(work, f"train-{run_dir.name}", f"training run {run_dir.name}", lock), reading_shards(Path(work)):
        result = train_dcgan(cfg, resume)
        if add_to_registry:
            result["registry"] = register_trained_run(work, cfg)
    return result
