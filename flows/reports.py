"""Stage reports: one markdown text, published as a Prefect artifact and saved under the work dir.

The file copy links a PNG saved next to it, so the report stays small and readable offline. The
artifact embeds a thumbnail of it as a data: URI (the Prefect UI does not render file:// links) and
names the full-size file. Never the full image: the server sends an artifact's whole data in its
`artifact-collection` events (prefect/server/events/schemas/lifecycle.py), and drops ("Refusing to
publish event of size ...") any event whose JSON is over PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES
(1,500,000 by default in prefect 3.9), which a report with a few full-size figures passed.
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

# One artifact's markdown, thumbnails included: a third of Prefect's event size limit (above).
ARTIFACT_MAX_BYTES = 500_000
THUMBNAIL_MAX_SIDE = 512  # pixels: a figure larger than that is scaled down
THUMBNAIL_MAX_BYTES = 64_000  # encoded, before base64; over it, JPEG, then smaller
THUMBNAIL_MIN_SIDE = 64  # below that a thumbnail says nothing: the artifact names the file only
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+\.png)\)")  # ![alt](relative/file.png)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def thumbnail(png: bytes, max_bytes: int = THUMBNAIL_MAX_BYTES, max_side: int = THUMBNAIL_MAX_SIDE) -> str | None:
    """A data: URI of the image at most `max_side` pixels wide and high and `max_bytes` long, or None.

    The PNG itself when it fits; else PNG, then JPEG (quality 90, 75), of the image scaled down, a
    quarter smaller each time until one fits. None when none fits above THUMBNAIL_MIN_SIDE pixels.
    """
    if max_bytes < 100:
        return None
    if len(png) <= max_bytes and max(_png_size(png)) <= max_side:
        return "data:image/png;base64," + base64.b64encode(png).decode()
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    side = min(max_side, max(image.shape[:2]))
    while side >= THUMBNAIL_MIN_SIDE:
        scale = side / max(image.shape[:2])
        small = image
        if scale < 1:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        for ext, params, mime in (
            (".png", [cv2.IMWRITE_PNG_COMPRESSION, 9], "png"),
            (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90], "jpeg"),
            (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 75], "jpeg"),
        ):
            ok, buf = cv2.imencode(ext, small, params)
            if ok and len(buf) <= max_bytes:
                return f"data:image/{mime};base64," + base64.b64encode(buf.tobytes()).decode()
        side = side * 3 // 4
    return None


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG header; (huge, huge) when it is not one (so it gets re-encoded)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return (1 << 30, 1 << 30)
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def artifact_markdown(markdown: str, folder: Path, max_bytes: int = ARTIFACT_MAX_BYTES) -> str:
    """`markdown` for a Prefect artifact: each `![alt](file.png)` (relative to `folder`) as a thumbnail
    followed by the full-size file's path, `max_bytes` at most in all: the figures share what the
    text leaves (one that does not fit is named only), and text longer than that is cut, with a note."""
    folder = Path(folder).resolve()
    links = list(_IMAGE_LINK.finditer(markdown))
    bounds = [0, *(x for m in links for x in m.span()), len(markdown)]
    texts = [markdown[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]  # around the links
    names = [f"{m.group(1) or 'Figure'}, full size: `{folder / m.group(2)}`" for m in links]
    budget = max_bytes - len("".join(texts + names).encode())
    text = texts[0]
    for i, m in enumerate(links):
        path = folder / m.group(2)
        share = budget // (len(links) - i) - len(m.group(1).encode()) - 10  # what `![alt](...)\n\n` adds
        uri = thumbnail(path.read_bytes(), min(THUMBNAIL_MAX_BYTES, share * 3 // 4)) if path.is_file() else None
        figure = f"![{m.group(1)}]({uri})\n\n" if uri else ""
        budget -= len(figure.encode())
        text += figure + names[i] + texts[i + 1]
    if len(text.encode()) > max_bytes:  # the text alone is that long (the figures then were left out)
        cut = text.encode()[: max_bytes - 200].decode(errors="ignore")
        text = cut + f"\n\n*(cut at {max_bytes} bytes: Prefect drops larger events; see the report files)*\n"
    return text


def create_report_artifact(markdown: str, folder: Path, key: str, description: str) -> None:
    """A markdown artifact of `markdown`, its figures (linked relative to `folder`) as thumbnails."""
    create_markdown_artifact(artifact_markdown(markdown, folder), key=key, description=description)


def report_key(name: str) -> str:
    """`extract-Faces_x` -> `extract-faces-x`: the artifact key and the file stem of a stage report."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def publish(work: Path, name: str, markdown: str, image: np.ndarray | bytes | None = None) -> Path:
    """Write `work/reports/<name>.md` (+ `<name>.png`) and create artifact `<name>`; returns the file."""
    reports = Path(work) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    key = report_key(name)
    file_md = markdown
    if image is not None:
        png = image if isinstance(image, bytes) else _png(image)
        atomic_write_bytes(reports / f"{key}.png", png)
        file_md += f"\n![{name}]({key}.png)\n"
    path = reports / f"{key}.md"
    atomic_write_bytes(path, file_md.encode())
    create_report_artifact(file_md, reports, key=key, description=f"dcgan-pipeline: {name}")
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
