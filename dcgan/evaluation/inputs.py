"""Check every input of an evaluation before anything is computed or written.

The evaluation writes figures as it goes; a bad CIFAR-10 table, .mat file, weights file,
arithmetic spec or boxes file found late would leave a half-written eval/<run>/. So each
is checked here first (cheaply: schemas and headers, not the data), and the parsed specs
are returned for the steps that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dcgan.evaluation.arithmetic import Arithmetic, parse_arithmetic
from dcgan.evaluation.cifar import EvaluationError, check_image_table
from dcgan.evaluation.feature_removal import Boxes, load_boxes
from dcgan.evaluation.inception import load_inception
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.sample_sheet import SHEET_SIZE
from dcgan.evaluation.svhn import SVHN_FILES, check_svhn_mat
from dcgan.settings import EvaluateSettings


@dataclass
class CheckedInputs:
    config: dict
    arithmetic: Arithmetic | None
    boxes: Boxes | None
    inception_network: str | None


def check_inputs(
    run: Path,
    settings: EvaluateSettings,
    *,
    checkpoint: Path | None = None,
    boxes: Path | None = None,
) -> CheckedInputs:
    """Raise a clear EvaluationError/CheckpointError for the first bad input; nothing is written."""
    cfg, *_ = load_run(Path(run), Path(checkpoint) if checkpoint else None)
    cifar10, svhn = settings.cifar10, settings.svhn
    inception = settings.inception
    if cifar10 is not None:
        for name in ("train.parquet", "test.parquet"):
            check_image_table(Path(cifar10) / name)
    if svhn is not None:
        if cfg["resolution"] != 32:
            raise EvaluationError(f"the SVHN protocol needs a 32 px discriminator; this run is {cfg['resolution']} px")
        for name in SVHN_FILES:
            check_svhn_mat(Path(svhn) / name)
    network = load_inception(Path(inception)).network if inception is not None else None
    spec = None
    if settings.arithmetic is not None:  # the settings model already requires the expression with it
        spec = parse_arithmetic(settings.arithmetic, settings.expression, SHEET_SIZE)
    parsed_boxes = load_boxes(Path(boxes), cfg["resolution"], SHEET_SIZE) if boxes is not None else None
    return CheckedInputs(cfg, spec, parsed_boxes, network)
