"""Markdown pieces shared by every stage report (Prefect-free, so domain packages render their own)."""

from __future__ import annotations


def table(rows: list[tuple], header: tuple) -> str:
    """A small markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
