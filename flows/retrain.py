"""Retraining that means something: train a challenger on new data, compare it with the champion, promote if better.

The comparison is the fixed protocol (`dcgan.evaluation.fixed_protocol`): both models are
measured on the same seeded reference images of the current shards and the same z's. The
decision and both sample grids go into the `retrain` report and artifact.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger

from dcgan.checkpoint import list_checkpoints
from dcgan.evaluation.fixed_protocol import comparison_figure, fixed_protocol
from dcgan.registry import (
    Decision,
    Registry,
    challenge,
    load_registry,
    metric_text,
    reference_settings,
    register_run,
)
from dcgan.settings import RetrainSettings, TrainSettings
from dcgan.train import resolve_device
from flows.config import stage_settings
from flows.progress import follow_subflows
from flows.reports import publish
from flows.runtime import stage_lock
from flows.train import check_train, train_flow
from preprocessing.locks import LockSettings
from preprocessing.markdown import table
from preprocessing.settings import parse_settings
from preprocessing.sharding import read_index, samples_added_since


def _skip_reason(registry: Registry, shards: Path, version: int, settings: RetrainSettings) -> str | None:
    """Why no challenger is needed (the champion, or an earlier challenger, saw these shards), or None."""
    if registry.champion is None:
        return None
    champion = registry.runs[registry.champion]
    tried = [n for n, r in registry.runs.items() if n.startswith("retrain-") and r.dataset_version == version]
    if tried and tried[-1] != registry.champion:
        return f"challenger {tried[-1]} already trained on shard version {version} and was not promoted"
    added = samples_added_since(shards, champion.dataset_version)
    if version == champion.dataset_version or added < settings.min_new_samples:
        return (
            f"the shards are at version {version}; the champion {registry.champion} trained on version "
            f"{champion.dataset_version} and {added} samples came since (retrain needs {settings.min_new_samples})"
        )
    return None


@task
def measure(work: str, run_dir: str, settings: RetrainSettings) -> dict:
    """The fixed protocol for one run, on the current shards."""
    device = str(resolve_device(settings.device))
    inception = Path(settings.inception) if settings.inception else None
    return fixed_protocol(Path(run_dir), Path(work) / "shards", settings.protocol_images, inception, device)


@task
def decide_and_report(
    work: str,
    version: int,
    challenger_dir: str,
    champion_dir: str | None,
    settings: RetrainSettings,
    metrics: dict,
    champion_metrics: dict | None,
) -> dict:
    """Register the challenger with its measured metrics, pit it against the champion, publish the decision."""
    w, run_dir = Path(work), Path(challenger_dir)
    challenger, champion = run_dir.name, Path(champion_dir).name if champion_dir else None
    register_run(w, challenger, run_dir, version, settings.model_dump(), metrics)
    decision: Decision = challenge(
        w, challenger, metric=settings.metric, margin=settings.margin, champion_metrics=champion_metrics
    )
    runs = load_registry(w).runs  # the report shows what the registry holds: one source for both
    rows = [
        (
            name,
            metric_text(runs[champion].metrics, name) if champion else "-",
            metric_text(runs[challenger].metrics, name),
        )
        for name in ("swd", "fid", "kid", "memorisation_ratio")
        if name in metrics
    ]
    md = "# Retrain\n\n" + table(
        rows, ("metric (lower is better, but memorisation)", champion or "no champion", challenger)
    )
    md += f"\n**{'Promoted' if decision.promote else 'Kept the champion'}:** {decision.reason}\n"
    left = Path(champion_dir) if champion_dir else run_dir
    figure = comparison_figure(left, run_dir, titles=(champion or challenger, challenger))
    publish(w, "retrain", md, figure)
    return {"decision": "promoted" if decision.promote else "kept", "reason": decision.reason, "challenger": challenger}


def effective_settings(registry: Registry, resolution: int, settings: RetrainSettings) -> RetrainSettings:
    """Train like the champion: fields not given explicitly come from its settings (or the newest run's).

    Without any registered run they are the defaults, at the shards' `resolution`.
    """
    base = {k: v for k, v in reference_settings(registry).items() if k in TrainSettings.model_fields}
    base.pop("init_from", None)
    base.setdefault("resolution", resolution)
    given = settings.model_dump(include=settings.model_fields_set)
    return parse_settings(RetrainSettings, {**base, **given}, "retrain settings")


@flow(name="retrain")
def retrain_flow(
    work: str, settings: RetrainSettings = RetrainSettings(), force: bool = False, lock: LockSettings = LockSettings()
) -> dict:
    """Train a challenger when the shards grew since the champion's training, and promote it only if it is better.

    Nothing is trained when the champion already saw the current shard version (unless
    `force`). Settings not given are the champion's (see `effective_settings`). A second
    retrain of the same work directory waits for the first (then finds nothing to do), or
    fails at once with `lock.wait` off.
    """
    follow_subflows()  # its training and measuring on this run too, where `--watch` shows them
    w = Path(work)
    with stage_lock(w, "retrain", "retrain", lock):
        registry, index = load_registry(w), read_index(w / "shards")
        version = index["version"]
        settings = effective_settings(registry, index["resolution"], settings)
        train_settings = stage_settings(TrainSettings, settings)
        check_train(work, train_settings)
        reason = None if force else _skip_reason(registry, w / "shards", version, settings)
        if reason is not None:
            get_run_logger().info("retrain skipped: %s", reason)
            publish(w, "retrain", f"# Retrain\n\nNothing to do: {reason}.\n")
            return {"decision": "skipped", "reason": reason}
        champion_dir = registry.runs[registry.champion].run_dir if registry.champion else None
        if settings.warm_start and champion_dir is not None:
            latest = list_checkpoints(Path(champion_dir))[-1]
            train_settings = train_settings.model_copy(update={"init_from": str(latest)})
        run = f"retrain-v{version}-{time.strftime('%Y%m%d-%H%M%S')}"
        trained = train_flow(work, train_settings, run=run, add_to_registry=False)
        metrics = measure(work, trained["run_dir"], settings)
        champion_metrics = measure(work, champion_dir, settings) if champion_dir else None
        return decide_and_report(work, version, trained["run_dir"], champion_dir, settings, metrics, champion_metrics)
