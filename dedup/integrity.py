"""Is dedup's part of a work directory whole: codes.parquet accounts for every ok item once, and its inputs read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dedup.autoencoder import AutoencoderError, load_autoencoder
from dedup.stage import DERIVED, dedup_dir, repair
from preprocessing.integrity import Findings
from preprocessing.state import DamagedStateError, load_npy, read_parquet, read_parquet_metadata


def check_dedup(work: Path, ok: set[str] | None) -> tuple[Findings, set[str] | None]:
    """Check dedup's files; returns the findings and the kept items (`<source>/<key>`, None without a dedup result).

    `ok`: every ok item of the extraction (None when a manifest is damaged: accounting is skipped).
    """
    found = Findings()
    folder = dedup_dir(work)
    if not folder.exists():
        return found, None
    for name in DERIVED:
        path = folder / name
        if not path.exists():
            continue
        try:
            load_npy(path, repair(work, name)) if name.endswith(".npy") else read_parquet_metadata(
                path, repair(work, name)
            )
        except DamagedStateError as exc:
            found.damaged("dedup", exc)
        found.checked["dedup files"] += 1
    model = folder / "autoencoder.pt"
    if model.exists():
        try:
            load_autoencoder(model)
        except AutoencoderError as exc:
            found.add("dedup", model, f"{model.name} does not load ({str(exc)[:120]})", repair(work, model.name))
        found.checked["dedup files"] += 1
    codes = folder / "codes.parquet"
    if not codes.exists():
        found.add(
            "dedup", codes, "codes.parquet is missing (dedup never finished)", f"dcgan-pipeline dedup --work {work}"
        )
        return found, None
    try:
        table = read_parquet(codes, repair(work, codes.name), columns=["key", "source", "keep"])
    except DamagedStateError as exc:
        found.damaged("dedup", exc)
        return found, None
    found.checked["dedup files"] += 1
    items = [f"{s}/{k}" for s, k in zip(table["source"].to_pylist(), table["key"].to_pylist(), strict=True)]
    twice = [i for i, n in Counter(items).items() if n > 1]
    if twice:
        found.add(
            "dedup", codes, f"codes.parquet lists {len(twice)} items twice, e.g. {twice[0]}", repair(work, "codes")
        )
    if ok is not None and set(items) != ok:
        found.add(
            "dedup",
            codes,
            f"codes.parquet does not cover the extracted items ({len(ok - set(items))} ok items not hashed, "
            f"{len(set(items) - ok)} items no longer ok): the extraction changed after dedup",
            f"dcgan-pipeline dedup --work {work}",
        )
    return found, {i for i, keep in zip(items, table["keep"].to_pylist(), strict=True) if keep}
