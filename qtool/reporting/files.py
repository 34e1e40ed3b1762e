"""The files a single-model report is written as: report.json/md/html, the JUnit file, the CI step summary."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qtool.errors import SideFileError, WriteError
from qtool.io.artifacts import append_text, write_text_atomic
from qtool.io.targets import begins_like, check_output_file
from qtool.reporting.document import render_json
from qtool.reporting.markdown import render_junit, render_markdown
from qtool.reporting.html import render_html


def report_writers(report: dict) -> dict[str, Callable[[Path], None]]:
    return {
        "report.json": lambda path: path.write_text(render_json(report), encoding="utf-8"),
        "report.md": lambda path: path.write_text(render_markdown(report), encoding="utf-8"),
        "report.html": lambda path: path.write_text(render_html(report), encoding="utf-8"),
    }


# what render_junit writes begins with
JUNIT_FILE = ("JUnit file qtool wrote", begins_like(rb'<\?xml[^>]*>\s*<testsuites>\s*<testsuite name="qtool '))


def check_ci_files(junit: str | Path | None, step_summary: str | Path | None, model_path: Path,
                   protected=(), overwrite: bool = False) -> None:
    """Before the run: neither the JUnit file nor the step summary may be (or hold) an input; an
    existing JUnit file is replaced only when empty, one qtool wrote, or with `overwrite`."""
    if junit is not None:
        check_output_file(Path(junit), model_path, protected, what="--junit file", overwrite=overwrite,
                          ours=JUNIT_FILE)
    if step_summary:
        check_output_file(Path(step_summary), model_path, protected, what="GITHUB_STEP_SUMMARY file")


def write_ci_files(report: dict, junit: str | Path | None, step_summary: str | Path | None,
                   artifacts: Path | None = None) -> None:
    """The JUnit file (written whole, then renamed) and the Markdown appended to a CI step summary.

    When `artifacts` (the output folder) is already complete, a failure here is a SideFileError
    (exit 4) that says so; otherwise a WriteError (exit 2).
    """
    try:
        if junit is not None:
            junit = Path(junit)
            if not junit.parent.is_dir():
                junit.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(junit, render_junit(report))
        if step_summary:
            append_text(Path(step_summary), render_markdown(report) + "\n")
    except (WriteError, OSError) as exc:
        message = str(exc) if isinstance(exc, WriteError) else f"{junit}: cannot write: {exc.strerror or exc}"
        if artifacts is not None:
            raise SideFileError(f"{message} (the artifacts in {artifacts} are complete)") from None
        raise WriteError(message) from None
