"""Check every input of an evaluation before anything is computed or written.

The evaluation writes figures as it goes; a bad CIFAR-10 table, .mat file, weights file,
arithmetic spec or boxes file found late would leave a half-written eval/<run>/. So each
is checked here first (cheaply: schemas and headers, not the data), and the parsed specs
are returned for the steps that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dcgan.evaluation.arithmetic import Arithmetic, parse_arithmetic
from dcgan.evaluation.cifar import EvaluationError, check_image_table
from dcgan.evaluation.feature_removal import Boxes, load_boxes
from dcgan.evaluation.inception import load_inception
from dcgan.evaluation.runs import load_run, resolve_checkpoint
from dcgan.evaluation.sample_sheet import SHEET_SIZE
from dcgan.evaluation.svhn import SVHN_FILES, check_svhn_mat
from dcgan.settings import EvaluateSettings


@dataclass
class CheckedInputs:
    config: dict
    arithmetic: Arithmetic | None
    boxes: Boxes | None
    inception_network: str | None
    checkpoint: Path  # the one evaluated: the given checkpoint, else the run's newest
    loaded: tuple[dict, nn.Module, nn.Module, int]  # load_run's (config, G, D, step) of it


def check_inputs(
    run: Path,
    settings: EvaluateSettings,
    *,
    checkpoint: Path | None = None,
    boxes: Path | None = None,
) -> CheckedInputs:
    """Raise a clear EvaluationError/CheckpointError for the first bad input; nothing is written.

    The run is loaded to check it (once): the result names the checkpoint it resolved and holds
    what `load_run` returned, for an evaluation to use instead of loading it again.
    """
    checkpoint = resolve_checkpoint(Path(run), Path(checkpoint) if checkpoint else None)
    loaded = load_run(Path(run), checkpoint)
    cfg = loaded[0]
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
    return CheckedInputs(cfg, spec, parsed_boxes, network, checkpoint, loaded)
