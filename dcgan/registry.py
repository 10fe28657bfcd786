"""The model registry of a work directory: every finished run, its evaluation, and the champion.

`<work>/models/registry.json` lists each registered training run with the dataset version it
trained on, its settings and its metrics on the fixed comparison protocol
(`dcgan.evaluation.fixed_protocol`), names the champion (the model to serve), and keeps a
history of every promotion, automatic or manual, with who, when and why. Writes are atomic
and serialised by a short lock, so a manual promotion and a retrain never lose each other's
update; a registry file that cannot be read is an error and is never overwritten.
(A retrain holds the long lock `<work>/locks/retrain.lock`: see preprocessing.locks.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preprocessing.atomic import atomic_write_json
from preprocessing.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "dcgan-pipeline-registry/1"
LOWER_IS_BETTER = ("swd", "fid", "kid")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ENTRY_FIELDS = {"run_dir": str, "dataset_version": int, "settings": dict, "metrics": dict, "registered_at": str}


class RegistryError(UserError):
    """A registry that cannot be read, a request it cannot honour, or a retrain already running."""


@dataclass
class RunEntry:
    run_dir: str
    dataset_version: int
    settings: dict[str, Any]
    metrics: dict[str, Any]
    registered_at: str


@dataclass
class Registry:
    champion: str | None = None
    runs: dict[str, RunEntry] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "champion": self.champion,
            "runs": {name: asdict(entry) for name, entry in self.runs.items()},
            "history": self.history,
        }


@dataclass(frozen=True)
class Decision:
    """Whether a challenger replaces the champion, with the numbers and the reason in words."""

    promote: bool
    metric: str
    champion: float | None
    challenger: float
    margin: float
    reason: str


def registry_path(work: Path) -> Path:
    return Path(work) / "models" / "registry.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parse(path: Path, data: object) -> Registry:
    """Check the whole shape, so a hand-edited or foreign file is refused before anything uses it."""

    def bad(why: str) -> RegistryError:
        return RegistryError(f"{path} is not a valid model registry ({why}); fix or move it away, nothing was changed")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"expected a JSON object with format {FORMAT!r}")
    if set(data) != {"format", "champion", "runs", "history"}:
        raise bad(f"expected keys champion, format, history, runs; got {sorted(data)}")
    runs, history, champion = data["runs"], data["history"], data["champion"]
    if not isinstance(runs, dict) or not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("runs must be an object and history a list of objects")
    entries = {}
    for name, entry in runs.items():
        if not isinstance(entry, dict) or set(entry) != set(_ENTRY_FIELDS):
            raise bad(f"run {name!r} must have exactly the keys {sorted(_ENTRY_FIELDS)}")
        for key, kind in _ENTRY_FIELDS.items():
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                raise bad(f"run {name!r}: {key} must be of type {kind.__name__}")
        entries[name] = RunEntry(**entry)
    if champion is not None and champion not in entries:
        raise bad(f"champion {champion!r} is not a registered run")
    return Registry(champion, entries, history)


def load_registry(work: Path) -> Registry:
    """The registry of a work directory; an empty one when none was written yet."""
    path = registry_path(work)
    if not path.exists():
        return Registry()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(
            f"cannot read the model registry {path}: {exc}; fix or move it away, nothing was changed"
        ) from exc
    return _parse(path, data)


@contextmanager
def _updating(work: Path) -> Iterator[Registry]:
    """Read, let the caller change, and write back the registry under an exclusive lock.

    The lock is held only for the read-modify-write, so concurrent writers wait a moment
    instead of overwriting each other. Nothing is written when the body raises.
    """
    path = registry_path(work)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".registry.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        registry = load_registry(work)
        yield registry
        atomic_write_json(path, registry.to_json())


def _check_json(what: str, value: object) -> None:
    if not isinstance(value, dict):
        raise RegistryError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must hold only JSON values (str, numbers, lists, dicts): {exc}") from exc


def register_run(
    work: Path, run_name: str, run_dir: Path, dataset_version: int, settings: dict, metrics: dict
) -> RunEntry:
    """Record a finished run with the dataset version it saw, its settings and its fixed-protocol metrics.

    Registering does not change the champion: `challenge` or `promote` does, and says why. The
    same run registered again (resumed and trained further) renews its entry.
    """
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        raise RegistryError(f"run name must be letters, digits, '.', '_' or '-', got {run_name!r}")
    if not isinstance(dataset_version, int) or isinstance(dataset_version, bool) or dataset_version < 0:
        raise RegistryError(f"dataset version must be an integer >= 0, got {dataset_version!r}")
    _check_json("settings", settings)
    _check_json("metrics", metrics)
    entry = RunEntry(str(run_dir), dataset_version, settings, metrics, _now())
    with _updating(work) as registry:
        old = registry.runs.get(run_name)
        if old is not None and Path(old.run_dir) != Path(run_dir):
            raise RegistryError(
                f"run {run_name!r} is already registered ({old.run_dir}, dataset version {old.dataset_version}, "
                f"{old.registered_at}); choose another run name"
            )
        registry.runs[run_name] = entry  # the same run again (resumed and trained further): its entry is renewed
        action = "register" if old is None else "re-register"
        registry.history.append({"at": entry.registered_at, "action": action, "run": run_name})
    log.info("registered run %s (dataset version %d)", run_name, dataset_version)
    return entry


def metric_text(metrics: dict, name: str) -> str:
    """A metric as `models` and the retrain report both show it (4 significant digits; '-' when absent)."""
    value = metrics.get(name)
    return "-" if value is None else f"{value:.4g}"


def _metric(metrics: dict, metric: str, whose: str) -> float:
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegistryError(f"the {whose}'s metrics have no number {metric!r} (keys: {sorted(metrics)})")
    return float(value)


def _protocol(metrics: dict, metric: str) -> object:
    """What must agree for `metric` to compare: the Inception weights matter only to FID and KID."""
    protocol = metrics.get("protocol")
    if isinstance(protocol, dict) and metric == "swd":
        return {k: v for k, v in protocol.items() if k != "inception_sha256"}
    return protocol


def decide(
    champion_metrics: dict | None, challenger_metrics: dict, metric: str = "swd", margin: float = 0.0
) -> Decision:
    """Promote the challenger only if its metric is lower than the champion's by a relative margin.

    Lower is better for every allowed metric (swd, fid, kid). The rule is relative, so one
    margin suits all three scales: promote iff challenger < champion - margin * |champion|
    (margin 0.05: at least 5% better; with margin 0 a tie keeps the champion). No champion
    yet: the challenger wins. A non-finite challenger never wins; a non-finite champion loses
    to any finite challenger. Both must have been measured on the same protocol (same
    reference images, image count and z seed; for FID/KID the same Inception weights), or the
    numbers do not compare.
    """
    if metric not in LOWER_IS_BETTER:
        raise RegistryError(f"metric must be one of {LOWER_IS_BETTER}, got {metric!r}")
    if not (isinstance(margin, int | float) and 0 <= margin < 1):
        raise RegistryError(f"margin is a fraction of the champion's value in [0, 1), got {margin!r}")
    new = _metric(challenger_metrics, metric, "challenger")
    if champion_metrics is None:
        return Decision(True, metric, None, new, margin, "no champion yet: the first registered run becomes champion")
    old = _metric(champion_metrics, metric, "champion")
    protocols = [_protocol(m, metric) for m in (champion_metrics, challenger_metrics)]
    if protocols[0] != protocols[1]:
        raise RegistryError(
            f"champion and challenger were measured on different protocols ({protocols[0]} vs {protocols[1]}): "
            "measure the champion again with fixed_protocol on the challenger's reference shards"
        )
    if not math.isfinite(new):
        return Decision(False, metric, old, new, margin, f"challenger {metric} is {new}: not a usable model")
    if not math.isfinite(old):
        return Decision(True, metric, old, new, margin, f"champion {metric} is {old}: any finite challenger wins")
    threshold = old - margin * abs(old)
    verdict = "beats" if new < threshold else "does not beat"
    reason = f"challenger {metric} {new:.6g} {verdict} champion {old:.6g} by the margin {margin:g} (< {threshold:.6g})"
    return Decision(new < threshold, metric, old, new, margin, reason)


def challenge(
    work: Path, run: str, *, metric: str = "swd", margin: float = 0.0, champion_metrics: dict | None = None
) -> Decision:
    """Pit a registered run against the champion with `decide`; promote it if it wins. Both outcomes are logged.

    `champion_metrics` replaces the champion's stored metrics, for a champion re-measured on
    the challenger's protocol (a dataset that grew has new reference images): the registry then
    holds the numbers the decision used, so `models` and the retrain report show the same.
    """
    with _updating(work) as registry:
        if run not in registry.runs:
            raise RegistryError(f"run {run!r} is not registered (registered: {sorted(registry.runs) or 'none'})")
        champ = registry.champion
        if champ is not None and champion_metrics is None:
            champion_metrics = registry.runs[champ].metrics
        elif champ is not None and champion_metrics is not None:
            _check_json("metrics", champion_metrics)
            registry.runs[champ].metrics = champion_metrics
            registry.history.append({"at": _now(), "action": "re-measure", "run": champ})
        decision = decide(champion_metrics if champ is not None else None, registry.runs[run].metrics, metric, margin)
        registry.history.append(
            {
                "at": _now(),
                "action": "promote" if decision.promote else "keep",
                "run": run,
                "previous": champ,
                "who": "registry",
                "why": decision.reason,
                "decision": asdict(decision),
            }
        )
        if decision.promote:
            registry.champion = run
    log.info("%s: %s", "promoted" if decision.promote else "kept the champion", decision.reason)
    return decision


def reference_settings(registry: Registry) -> dict:
    """The training settings a retrain starts from: the champion's, else the newest registered run's, else none."""
    name = registry.champion
    if name is None and registry.runs:
        name = max(registry.runs, key=lambda n: registry.runs[n].registered_at)
    return dict(registry.runs[name].settings) if name else {}


def promote(work: Path, run: str, who: str, why: str) -> Registry:
    """Make a registered run the champion by hand, whatever its metrics; the override is kept in the history."""
    for name, value in (("who", who), ("why", why)):
        if not isinstance(value, str) or not value.strip():
            raise RegistryError(f"a manual promotion needs a non-empty {name!r}")
    with _updating(work) as registry:
        if run not in registry.runs:
            raise RegistryError(f"run {run!r} is not registered (registered: {sorted(registry.runs) or 'none'})")
        registry.history.append(
            {
                "at": _now(),
                "action": "manual-promote",
                "run": run,
                "previous": registry.champion,
                "who": who,
                "why": why,
            }
        )
        registry.champion = run
    log.info("%s promoted %s by hand: %s", who, run, why)
    return registry
