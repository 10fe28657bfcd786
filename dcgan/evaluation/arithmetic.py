"""Vector arithmetic on visual concepts (paper section 6.3.2, figure 7).

A concept is a set of exemplar samples picked by index from the numbered sample sheet; its
vector is the mean of their z's (the paper found single samples unstable and averaged three).
An expression such as `A - B + C` combines the concept means into a result z, which is shown
with `neighbours` samples at z + uniform noise in [-noise_scale, noise_scale] per dimension
(the paper's figure 7: 8 neighbours at +-0.25). The result is not clipped to the prior.

Input format: concepts as `"A=1,5,9;B=2,3,4;C=7,8,11"` (name = exemplar indices) and an
expression of concept names joined by + and - (`"A-B+C"`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dcgan.evaluation.cifar import EvaluationError
from dcgan.evaluation.figures import captioned_grid
from dcgan.evaluation.quality import generate

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


@dataclass
class Arithmetic:
    concepts: dict[str, list[int]]
    terms: list[tuple[int, str]]  # (+1 or -1, concept name), in expression order

    @property
    def expression(self) -> str:
        text = " ".join(f"{'-' if s < 0 else '+'} {name}" for s, name in self.terms)
        return text[2:] if text.startswith("+ ") else text


def parse_arithmetic(concepts: str, expression: str, sheet_size: int) -> Arithmetic:
    """Parse and check concepts and expression against a sheet of `sheet_size` samples."""
    parsed: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in concepts.split(";"))):
        name, eq, indices = (s.strip() for s in part.partition("="))
        if not eq or not re.fullmatch(_NAME, name):
            raise EvaluationError(f"concept {part!r} is not NAME=i,j,k (e.g. A=1,5,9)")
        if name in parsed:
            raise EvaluationError(f"concept {name} is defined twice")
        items = [s.strip() for s in indices.split(",") if s.strip()]
        if not items:
            raise EvaluationError(f"concept {name} has no exemplar indices (needs at least 1)")
        if not all(re.fullmatch(r"\d+", s) for s in items):
            raise EvaluationError(f"concept {name}: exemplar indices must be whole numbers, got {indices!r}")
        out_of_range = [int(s) for s in items if int(s) >= sheet_size]
        if out_of_range:
            raise EvaluationError(
                f"concept {name}: index {out_of_range[0]} is out of range (the sample sheet has 0..{sheet_size - 1})"
            )
        parsed[name] = [int(s) for s in items]
    if not parsed:
        raise EvaluationError("no concepts given (expected e.g. A=1,5,9;B=2,3,4)")
    compact = expression.replace(" ", "")
    if not re.fullmatch(rf"[+-]?{_NAME}([+-]{_NAME})*", compact):
        raise EvaluationError(f"expression {expression!r} is not concept names joined by + and - (e.g. A-B+C)")
    terms = [(-1 if sign == "-" else 1, name) for sign, name in re.findall(rf"([+-]?)({_NAME})", compact)]
    unknown = sorted({name for _, name in terms} - set(parsed))
    if unknown:
        raise EvaluationError(f"unknown concept(s) {unknown} in {expression!r} (defined: {', '.join(parsed)})")
    return Arithmetic(parsed, terms)


def vector_arithmetic(
    G: nn.Module,
    z_sheet: torch.Tensor,
    spec: Arithmetic,
    *,
    neighbours: int = 8,
    noise_scale: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """The figure-7 grid (a row per concept: exemplars + mean; last row: result + neighbours) and a summary."""
    names = list(dict.fromkeys(name for _, name in spec.terms))
    means = {name: z_sheet[spec.concepts[name]].mean(0) for name in names}
    result = sum(sign * means[name] for sign, name in spec.terms)
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(neighbours, z_sheet.shape[1], generator=g) * 2 - 1) * noise_scale
    columns = max(max(len(spec.concepts[n]) for n in names) + 1, neighbours + 1)
    images: list[np.ndarray | None] = []
    captions: list[str] = []
    for name in names:
        idx = spec.concepts[name]
        row = generate(G, torch.cat([z_sheet[idx], means[name][None]]))
        images += [*row, *[None] * (columns - len(row))]
        captions += [f"{name} #{i}" for i in idx] + [f"mean {name}"] + [""] * (columns - len(row))
    row = generate(G, torch.cat([result[None], result[None] + noise]))
    images += [*row, *[None] * (columns - len(row))]
    captions += [spec.expression.replace(" ", "")] + ["+noise"] * neighbours + [""] * (columns - len(row))
    summary = {
        "expression": spec.expression,
        "concepts": {n: spec.concepts[n] for n in names},
        "neighbours": neighbours,
        "noise_scale": noise_scale,
        "result_z_norm": float(result.norm()),
    }
    return captioned_grid(images, captions, columns), summary
