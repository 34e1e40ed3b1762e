"""The JSON Schemas (2020-12) of the reports qtool writes, shipped in the package.

`report.schema.json` validates a `qtool quantize`/`compare` report.json, `tune-report.schema.json`
a `qtool sensitivity`/`tune` report.json. `qtool schema report|tune-report` prints them.
"""

from __future__ import annotations

import json
from importlib import resources

REPORT_SCHEMAS = {"report": "report.schema.json", "tune-report": "tune-report.schema.json"}


def report_schema(kind: str) -> dict:
    """The JSON Schema of one report kind: "report" or "tune-report" (KeyError for any other)."""
    text = resources.files(__package__).joinpath(REPORT_SCHEMAS[kind]).read_text(encoding="utf-8")
    return json.loads(text)
