"""The top of report.html (tiles, next step, worst slice), chart units, and Markdown escaping only where needed."""

from __future__ import annotations

import copy

import pytest

from conftest import SAMPLE
from qtool import api
from qtool.reporting.markdown import md_escape, render_markdown
from qtool.reporting.html import human_bytes, next_step, render_html
from qtool.recipe.schema import Recipe


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("top")
    return api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", Recipe(), root / "q",
                        validation_data=SAMPLE / "eval", per_layer=True).report


def test_worst_output_slice_is_a_tile_when_the_report_has_it(report):
    with_slices = copy.deepcopy(report)
    with_slices["validation"]["outputs"]["logits"]["worst_slice"] = {"axis": 1, "index": 7, "sqnr_db": 31.25,
                                                                     "slices": 10}
    page = render_html(with_slices)
    top = page[:page.index("<h2>Gates</h2>")]
    assert "31.25 dB" in top and "index 7 on axis 1 (of 10)" in top
    without = copy.deepcopy(report)
    for figures in without["validation"]["outputs"].values():
        figures["worst_slice"] = None  # an output with no feature axis
    assert "worst slice" not in render_html(without)


def test_next_step_and_units(report):
    assert next_step(report) == ("Every gate passed. Measure the speed-up on your target with --bench "
                                 "(and --provider).", None)
    failed = {**report, "passed": False}
    text, command = next_step(failed)
    assert command.startswith(f"qtool tune {SAMPLE / 'model.onnx'} --data {SAMPLE / 'calib'} --validation-data ")
    assert [human_bytes(n) for n in (512, 4_750_000, 182_997)] == ["512 B", "4.8 MB", "183.0 KB"]
    page = render_html(report)
    assert "e+0" not in page  # byte axes in KB/MB, not 4.75e+06 B


def test_exact_weights_are_grouped_not_charted(report):
    layers = copy.deepcopy(report)
    layers["layers"]["weights"].append({**layers["layers"]["weights"][0], "tensor": "exact_const",
                                        "sqnr_db": float("inf")})
    page = render_html(layers)
    assert "1 weight(s) stored exactly (SQNR inf)" in page and "exact_const" in page.split("stored exactly")[1]
    assert "exact_const</text>" not in page  # no bar for it


def test_markdown_escapes_only_what_markdown_reads():
    assert md_escape("weights in 7 bits (per-channel, auto) #2 a+b!") == \
        "weights in 7 bits (per-channel, auto) #2 a+b!"
    assert md_escape("[x](http://e) *a* _b_ `c` |d| <e>") == \
        "\\[x\\]\\(http://e) \\*a\\* \\_b\\_ \\`c\\` \\|d\\| &lt;e&gt;"
    assert md_escape("- not a list") == "\\- not a list"


def test_markdown_notes_read_as_written(report):
    noted = {**report, "warnings": ["ranges (per-channel) look odd"]}
    assert "- warning: ranges (per-channel) look odd" in render_markdown(noted)
