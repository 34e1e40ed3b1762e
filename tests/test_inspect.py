"""`qtool inspect`: model facts and what qtool would do, problems listed and never raised."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE, make_model, shared_model
from qtool import api
from qtool.cli.main import main


def inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(main, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def tiny_model(opset: int = 13) -> onnx.ModelProto:
    """Conv → Relu → Shape: one quantizable op, one folded into it, one not in the rule table."""
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 6])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [4])
    return make_model(nodes, [x], [y, s], {"w": weight}, opset=opset)


def test_facts_of_a_tiny_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    facts = inspect_json(str(path))
    assert facts["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 8, 8],
                                "batch_axis": {"axis": 0, "fixed": False,
                                               "reason": "its first symbolic dimension ('batch')"}}]
    assert facts["outputs"][1] == {"name": "s", "dtype": "int64", "shape": [4]}
    assert (facts["opset"], facts["ir_version"]) == (13, 8)
    assert facts["family"] is None
    assert facts["op_types"] == {"Conv": 1, "Relu": 1, "Shape": 1}
    assert facts["problems"] == [] and facts["quantizable"] is True
    assert facts["external_data"] == {"files": [], "total_bytes": 0}
    decisions = {d["node"]: (d["quantized"], d["reason"]) for d in facts["quantization"]["nodes"]}
    assert decisions == {"conv": (True, "rule Conv"), "relu": (True, "rule Relu"),
                         "shape": (False, "op type not in the rule table")}


def test_recipe_exclusions_are_named(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nquantization:\n  exclude: {op_types: [Conv]}\n")
    quant = inspect_json(str(path), "--recipe", str(recipe))["quantization"]
    assert quant["recipe"] == str(recipe.resolve())
    assert quant["float_reasons"]["excluded: quantization.exclude.op_types"] == {"Conv": 1}


def test_old_opset_is_a_change_and_unsafe_external_data_a_refusal(tmp_path):
    model = tiny_model(opset=11)
    weight = model.graph.initializer[0]
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.external_data.add(key="location", value="../secrets.bin")
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    facts = api.inspect(path)  # must not raise: it reports
    assert [p.action for p in facts.problems] == ["change", "refuse"]
    assert "opset 11 is below 13" in facts.problems[0].message
    assert "points outside the model's folder" in facts.problems[1].message
    assert facts.decisions is None and not facts.quantizable
    assert facts.as_dict()["external_data"]["files"] == [{"location": "../secrets.bin", "bytes": None,
                                                          "status": "outside"}]


def test_external_data_outside_the_folder_is_said_refused_even_when_it_exists(tmp_path):
    """New-user finding 12: an existing ../outside/w.bin printed as `(missing)`."""
    model = tiny_model()
    weight = model.graph.initializer[0]
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "w.bin").write_bytes(numpy_helper.to_array(weight).tobytes())
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.external_data.add(key="location", value="../outside/w.bin")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(model.SerializeToString())
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m" / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "external data ../outside/w.bin (outside the model's folder: refused)" in " ".join(result.output.split())


def test_already_quantized_model_is_reported(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                       {"s": np.float32(0.1), "z": np.uint8(0)})
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0
    assert "refuse:" in result.output and "already quantized" in result.output


def test_unreadable_file_is_the_only_error(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and "file is empty" in result.output


def test_quiet_prints_nothing_and_verbose_lists_nodes():
    runner = CliRunner()
    assert runner.invoke(main, ["inspect", str(SAMPLE / "model.onnx"), "-q"]).output == ""
    verbose = runner.invoke(main, ["inspect", str(SAMPLE / "model.onnx"), "--verbose"]).output
    assert verbose.count("  node ") == 13


@pytest.mark.parametrize("name, opset, family", [("ppocr_cls", 11, "PaddleOCR text-line classifier"),
                                                 ("ppocr_det", 12, "PaddleOCR text detector (DB)")])
def test_shared_models_list_opset_problem_and_quantized_nodes(name, opset, family):
    facts = inspect_json(str(shared_model(name) / "model.onnx"))
    assert facts["family"].startswith(family)
    assert facts["problems"] == [{
        "action": "change",
        "message": f"opset {opset} is below 13 (per-channel QuantizeLinear/DequantizeLinear needs `axis`): "
                   "qtool upgrades it to 13",
    }]
    quant = facts["quantization"]
    assert quant["quantized_op_types"]["Conv"] >= 50
    assert quant["nodes_quantized"] > quant["nodes_float"] > 0
    assert all(reason for reason in quant["float_reasons"])
    assert facts["inputs"][0]["name"] == "x" and facts["inputs"][0]["shape"][1] == 3


def test_data_that_cannot_feed_the_model_is_exit_2_naming_the_file(tmp_path):
    """inspect --data reads the first sample as quantize would: a file of the wrong shape, a missing or
    empty folder is one line and exit 2, never an internal error."""
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "a.npy", np.zeros((1, 3, 5, 5), np.float32))
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(model), "--data", str(wrong)])
    assert (result.exit_code, result.output) == (2, f"Error: {wrong / 'a.npy'}: array of shape [1, 3, 5, 5] does "
                                                    "not fit input x: float32 [batch, 3, 8, 8]\n")
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        result = runner.invoke(main, ["inspect", str(model), "--data", str(folder)])
        assert result.exit_code == 2 and result.output.startswith(f"Error: {folder}: "), result.output


def test_data_previews_placement_fast_on_its_first_sample(tmp_path):
    """Without data, inspect counts `placement: fast` as fused and says so; with data it estimates on the
    first sample's shapes, as quantize: the tiny model's int8 kernels do not pay, so it stays float."""
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    data = tmp_path / "calib"
    data.mkdir()
    np.save(data / "a.npy", np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32))
    unshaped = inspect_json(str(model))
    shaped = inspect_json(str(model), "--data", str(data))
    assert unshaped["quantization"]["nodes_quantized"] == 2
    assert any(note.endswith("counted as fused") for note in unshaped["prepare"])
    assert shaped["quantization"]["nodes_quantized"] == 0
    assert {d["node"]: d["reason"].split(":")[0] for d in shaped["quantization"]["nodes"] if d["node"] != "shape"} == {
        "conv": "placement fast", "relu": "placement fast"}
    # quantize refuses that plan (exit 2): inspect lists the refusal, not only "0 of 3 nodes"
    [refusal] = [problem for problem in shaped["problems"] if problem["action"] == "refuse"]
    assert "no 8-bit kernel pays here" in refusal["message"] and "nothing written" not in refusal["message"]
    assert unshaped["problems"] == []
