"""Stage reports: one markdown text, published as a Prefect artifact and saved under the work dir.

The artifact embeds its image as a data: URI (the Prefect UI does not render file:// links);
the file copy links a PNG saved next to it, so the report stays small and readable offline.
"""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
from prefect.artifacts import create_markdown_artifact

from preprocessing.atomic import atomic_write_bytes
from preprocessing.markdown import table


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def report_key(name: str) -> str:
    """`extract-Faces_x` -> `extract-faces-x`: the artifact key and the file stem of a stage report."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def publish(work: Path, name: str, markdown: str, image: np.ndarray | bytes | None = None) -> Path:
    """Write `work/reports/<name>.md` (+ `<name>.png`) and create artifact `<name>`; returns the file."""
    reports = Path(work) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    key = report_key(name)
    file_md, artifact_md = markdown, markdown
    if image is not None:
        png = image if isinstance(image, bytes) else _png(image)
        atomic_write_bytes(reports / f"{key}.png", png)
        file_md += f"\n![{name}]({key}.png)\n"
        artifact_md += f"\n![{name}](data:image/png;base64,{base64.b64encode(png).decode()})\n"
    path = reports / f"{key}.md"
    atomic_write_bytes(path, file_md.encode())
    create_markdown_artifact(artifact_md, key=key, description=f"dcgan-pipeline: {name}")
    return path


def stage_markdown(work: Path, name: str) -> str:
    """The file copy of a stage report, its image links made relative to `work` (for `work/report.md`)."""
    text = (Path(work) / "reports" / f"{report_key(name)}.md").read_text()
    return re.sub(r"\]\((?![a-z]+:|/)", "](reports/", text)


def frozen_report(work: Path, label: str) -> str:
    """`work/report.md` with its images copied to `reports/<label>/` and linked there.

    A later run of the same stages rewrites their reports and images under the same names; the
    frozen text keeps showing this run's figures.
    """
    work = Path(work)
    folder = work / "reports" / label
    folder.mkdir(parents=True, exist_ok=True)

    def relink(match: re.Match) -> str:
        image = work / match.group(1)
        if not image.is_file():
            return match.group(0)
        shutil.copyfile(image, folder / image.name)
        return f"](reports/{label}/{image.name})"

    return re.sub(r"\]\((reports/[^)/]+\.png)\)", relink, (work / "report.md").read_text())


def write_combined_report(work: Path, title: str, parts: list[tuple[str, str]]) -> Path:
    """`work/report.md` from (heading, markdown) parts, each part's own headings one level down."""
    body = [f"# {title}\n"]
    for heading, markdown in parts:
        body.append(f"## {heading}\n\n" + re.sub(r"^(#+) ", r"##\1 ", markdown, flags=re.MULTILINE))
    path = Path(work) / "report.md"
    atomic_write_bytes(path, "\n\n".join(body).encode())
    return path


def part_totals(summaries: list[dict], count: str, wall: float) -> tuple[dict[str, int], int, float]:
    """(rejects by reason, parts resumed from disk, items/s of the parts done now) of a mapped stage."""
    rejected: dict[str, int] = {}
    for s in summaries:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    done = [s for s in summaries if not s["skipped"]]
    rate = sum(s[count] for s in done) / wall if done and wall > 0 else 0.0
    return rejected, len(summaries) - len(done), rate


def rejects_section(rejected: dict[str, int]) -> str:
    return "\n## Rejected by reason\n\n" + table(sorted(rejected.items()), ("reason", "count")) if rejected else ""
