"""Tune and sensitivity reports open with their charts: the target gate drawn, long tables collapsed."""

from __future__ import annotations

import re

import pytest

from qtool.reporting.search import frontier_chart, gate_level, render_html


def trial(name, size, figure, passed, chosen=False, promotions=()):
    return {"trial": name, "size_bytes": size, "size_ratio": 4.0, "objective": figure, "accuracy": figure,
            "passed": passed, "frontier": True, "chosen": chosen, "sqnr_db": 20.0, "latency_ratio": None,
            "promotions": [{"node": f"/n{i}", "step": "float"} for i in range(len(promotions))]}


@pytest.mark.parametrize("target, level", [
    ({"gates": {"min_cosine": 0.99}, "objective": "cosine"}, 0.99),
    ({"gates": {"min_sqnr_db": 25}, "objective": "sqnr_db"}, 25.0),
    ({"gates": {"max_accuracy_drop": 0.01}, "objective": "accuracy", "float_accuracy": 0.93}, 0.92),
    ({"gates": {"max_accuracy_drop": 0.01}, "objective": "accuracy", "float_accuracy": None}, None),
])
def test_gate_level_on_the_objective_axis(target, level):
    assert gate_level(target) == pytest.approx(level) if level is not None else gate_level(target) is None


def test_the_gate_line_lies_between_a_failing_and_a_passing_trial():
    svg = frontier_chart([trial("a", 100, 0.90, False), trial("b", 120, 0.995, True, chosen=True)], "cosine", 0.99)
    gate_y = float(re.search(r'class="gate" x1="[\d.]+" y1="([\d.]+)"', svg)[1])
    dots = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)" r="5"', svg)]
    assert min(dots) < gate_y < max(dots)  # SVG y grows downwards: the passing dot is above the line
    assert "gate 0.99" in svg and "KB" not in svg and "100 B" in svg


def test_tune_report_opens_with_the_charts_and_folds_the_promotions():
    many = tuple(range(128))
    report = {"command": "tune", "passed": True, "interrupted": False, "warnings": [], "prepare": [],
              "inputs": {"model": {"path": "m.onnx"}},
              "target": {"gates": {"min_cosine": 0.99}, "objective": "cosine", "float_accuracy": None},
              "search": {"trials_run": 2, "wall_s": 1.0, "stop_reason": "done"},
              "chosen": {"trial": "b", "promotions": trial("b", 0, 0, True, promotions=many)["promotions"]},
              "trials": [trial("a", 100, 0.90, False), trial("b", 120, 0.995, True, True, many)],
              "latency": {"status": "off"}, "sensitivity": {"rows": [{"rank": 1, "node": "/n0", "sqnr_db": 9.0}]}}
    page = render_html(report)
    assert page.index("<svg") < page.index("<details>") < page.index("/n127")
    assert page.count("<details>") == 2  # promotions and the sensitivity ranking
    sensitivity = render_html({**report, "command": "sensitivity", "sensitivity": {
        "mode": "only_quantized", "cache": {"hit": False},
        "rows": [{"rank": i + 1, "node": f"/n{i}", "sqnr_db": 10.0 + i} for i in range(50)]}})
    assert sensitivity.count("<svg") == 1 and "the 40 most sensitive" in sensitivity
    assert sensitivity.index("<svg") < sensitivity.index("<details>")


def test_the_trials_table_shows_the_gated_figure_once_each():
    """Finding 8: gates {min_slice_sqnr_db: 14.5} (objective sqnr_db) showed 14.74 under both `sqnr_db` and
    `SQNR dB` and marked the row fail: the gate read the worst slice (14.24), which no column showed."""
    from qtool.reporting.search import render_markdown

    row = {**trial("a", 100, 14.74, False, chosen=True), "sqnr_db": 14.74, "slice_sqnr_db": 14.24,
           "latency_ratio": None}
    report = {"command": "tune", "passed": False, "final": True, "interrupted": False, "warnings": [],
              "prepare": [], "inputs": {"model": {"path": "m.onnx"}},
              "target": {"gates": {"min_slice_sqnr_db": 14.5}, "objective": "sqnr_db", "float_accuracy": None},
              "search": {"trials_run": 1, "max_trials": 5, "wall_s": 1.0, "jobs": 1, "stop_reason": "done"},
              "chosen": {"trial": "a", "promotions": [], "size_ratio": 4.0},
              "trials": [row], "latency": {"status": "off"}, "sensitivity": {"rows": []}}
    text = render_markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| # |"))
    assert header == "| # | trial | promotions | size B | size ratio | latency ratio | sqnr_db | worst slice dB | gates |"
    assert "| 14.74 | 14.24 | fail |" in text
    table = render_html(report).split("<h2>Trials</h2>")[1]
    assert table.count("14.74") == 1 and "<th class=\"num\">worst slice dB</th>" in table and "14.24" in table
    cosine = render_markdown({**report, "target": {**report["target"], "gates": {"min_cosine": 0.99},
                                                   "objective": "cosine"}})
    assert "| cosine | SQNR dB | gates |" in cosine  # no gate on SQNR: it is still shown, once
