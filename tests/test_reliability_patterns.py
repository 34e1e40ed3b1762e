"""Recipe regexes against names the model controls: bounded time, a timeout is exit 2 naming the
pattern (issue 16, E; docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import make_model, save_npy_folder
from qtool.cli.main import main
from qtool.recipe import patterns


def test_a_backtracking_exclude_pattern_is_an_exit_2_naming_it(tmp_path, monkeypatch):
    name = "a" * 20000 + "!"  # (a+)+$ against it: `re` never finishes
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name=name)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(model, tmp_path / "model.onnx")
    save_npy_folder(tmp_path / "data", np.ones((2, 1, 4)))
    (tmp_path / "r.yaml").write_text('version: 1\nquantization:\n  exclude:\n    nodes: ["(a+)+$"]\n')
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT_S", 0.2)
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "r.yaml"),
                                       "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Error: recipe pattern '(a+)+$' took over 0.2 s to match the name 'aaaa" in result.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_patterns_match_as_re_fullmatch_does():
    assert patterns.fullmatch("/head/.*", "/head/Conv")
    assert not patterns.fullmatch("/head/.*", "/body/head/Conv")
    assert patterns.fullmatch(r"^conv\[0\]$", "conv[0]")
