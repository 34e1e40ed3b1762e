"""Every report validates against the shipped report schema (qtool schema report); model strings stay text in HTML, Markdown and JUnit."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import SAMPLE, make_model, save_npy_folder, fused_recipe
from qtool import api
from qtool.reporting.markdown import render_junit, render_markdown
from qtool.reporting.html import render_html
from qtool.reporting.schemas import report_schema

SCHEMA = report_schema("report")
HOSTILE = "<script>alert(1)</script>"


def validate(report_file: Path) -> dict:
    report = json.loads(report_file.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    return report


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A Conv -> Relu -> Gemm classifier whose node and tensor names are markup, quantized with everything on."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], [f"conv{HOSTILE}"], name=f"{HOSTILE}conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [f"conv{HOSTILE}"], ["r"], name=f"relu{HOSTILE}"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw"], [f"logits{HOSTILE}"], name=f"gemm{HOSTILE}", transB=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])],
                       [helper.make_tensor_value_info(f"logits{HOSTILE}", TensorProto.FLOAT, [None, 10])],
                       {"w": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
                        "b": rng.normal(size=3).astype(np.float32),
                        "fw": rng.normal(size=(10, 48)).astype(np.float32)})
    onnx.save(model, str(root / "float.onnx"))
    data = save_npy_folder(root / "data", rng.normal(size=(16, 1, 2, 4, 4)))
    (data / "labels.txt").write_text("".join(f"{i:04d}.npy {i % 10}\n" for i in range(16)))
    recipe = root / "gates.yaml"
    recipe.write_text("version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_cosine: 0.5, min_size_ratio: 100}\n")
    result = api.quantize(root / "float.onnx", data, recipe, root / "quantize", per_layer=True, bench=True)
    compared = api.compare(root / "float.onnx", root / "quantize" / "model.onnx", data, root / "compare",
                           recipe=recipe, per_layer=True, bench=True, junit=root / "junit.xml")
    return root, result, compared


def test_hostile_names_render_as_text_in_html(hostile):
    root, _, _ = hostile
    for folder in ("quantize", "compare"):
        page = (root / folder / "report.html").read_text()
        assert "<script" not in page.lower()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert page.count("<svg") >= 3  # output error, per-layer SQNR, sizes (and latency)


def test_hostile_names_are_escaped_in_markdown_and_junit(hostile):
    root, result, compared = hostile
    for folder in ("quantize", "compare"):
        text = (root / folder / "report.md").read_text()
        assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    junit = (root / "junit.xml").read_text()
    cases = ET.fromstring(junit).findall(".//testcase")
    assert [(c.get("name"), c.find("failure") is not None) for c in cases] == [("min_cosine", False),
                                                                                ("min_size_ratio", True)]
    assert not compared.passed and not result.passed


def test_quantize_and_compare_reports_validate(hostile):
    root, _, _ = hostile
    quantize = validate(root / "quantize" / "report.json")
    compare = validate(root / "compare" / "report.json")
    for report in (quantize, compare):
        assert {"layers", "latency"} <= set(report)
        assert any(HOSTILE in row["node"] for row in report["layers"]["activations"] + report["layers"]["weights"])


def test_minimal_reports_validate(tmp_path):
    """Without per-layer and bench: the optional sections are absent and the rest still validates."""
    result = api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", fused_recipe(), tmp_path / "q",
                          validation_data=SAMPLE / "eval")
    assert "layers" not in validate(tmp_path / "q" / "report.json")
    api.compare(SAMPLE / "model.onnx", tmp_path / "q" / "model.onnx", SAMPLE / "eval", tmp_path / "c")
    report = validate(tmp_path / "c" / "report.json")
    assert "layers" not in report and "latency" not in report and report["inputs"]["recipe"] is None
    assert result.passed


def test_renderers_accept_infinite_figures():
    """An identical candidate has SQNR inf: JSON writes "inf", Markdown and HTML show it, JUnit too."""
    report = {
        "schema_version": 1, "command": "compare", "passed": True,
        "versions": {"qtool": "0", "onnx": "0", "onnxruntime": "0", "numpy": "0", "python": "3"},
        "inputs": {"reference": {"path": "a.onnx", "sha256": "0" * 64}, "candidate": {"path": "b.onnx", "sha256": "1" * 64},
                   "recipe": None, "validation_data": {"path": "d", "listing_sha256": "2" * 64}, "labels": None},
        "size": {"float_bytes": 10, "quantized_bytes": 10, "ratio": 1.0},
        "validation": {"samples": 1, "outputs": {"y": {"cosine": 1.0, "sqnr_db": float("inf"), "mse": 0.0,
                                                       "max_abs_error": 0.0, "mean_abs_error": 0.0}}},
        "gates": [{"name": "min_sqnr_db", "threshold": 30.0, "value": float("inf"), "passed": True}],
        "warnings": [],
    }
    assert "| inf |" in render_markdown(report)
    assert "inf" in render_html(report)
    assert 'tests="1" failures="0"' in render_junit(report)
