"""The files a single-model report is written as: report.json/md/html, the JUnit file, the CI step summary."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qtool.io.artifacts import write_text_atomic
from qtool.reporting import document as reporting
from qtool.reporting.html import render_html


def report_writers(report: dict) -> dict[str, Callable[[Path], None]]:
    return {
        "report.json": lambda path: path.write_text(reporting.render_json(report), encoding="utf-8"),
        "report.md": lambda path: path.write_text(reporting.render_markdown(report), encoding="utf-8"),
        "report.html": lambda path: path.write_text(render_html(report), encoding="utf-8"),
    }


def write_ci_files(report: dict, junit: str | Path | None, step_summary: str | Path | None) -> None:
    """The JUnit file (written whole, then renamed) and the Markdown appended to a CI step summary."""
    if junit is not None:
        junit = Path(junit)
        junit.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(junit, reporting.render_junit(report))
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(reporting.render_markdown(report) + "\n")
