"""Model classes other quantizers break on: each is quantized correctly, or refused with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, save_npy_folder, shared_model
from qtool import api
from qtool.recipe.load import load_recipe

RNG = np.random.default_rng(0)
INT8 = ROOT / "configs" / "int8.yaml"


def run_both(float_model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict) -> tuple:
    expected = ort.InferenceSession(float_model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(quantized.SerializeToString()).run(None, feeds)[0]
    return expected, got


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- weights also listed as graph inputs (IR < 4, keep_initializers_as_inputs) ---------------

def conv_with_initializer_inputs(ir_version: int, opset: int, batchnorm: bool) -> onnx.ModelProto:
    """x [N, 3, 8, 8] → Conv (→ BatchNormalization) → Relu, every initializer also a graph input."""
    weights = {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    if batchnorm:
        weights.update(s=RNG.uniform(0.5, 1.5, 4).astype(np.float32), o=RNG.normal(size=4).astype(np.float32),
                       m=RNG.normal(size=4).astype(np.float32), v=RNG.uniform(0.5, 1.5, 4).astype(np.float32))
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["n"], name="bn"))
    nodes.append(helper.make_node("Relu", [nodes[-1].output[0]], ["y"], name="relu"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])] + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, array.shape) for name, array in weights.items()]
    graph = helper.make_graph(nodes, "defaults", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(array, name) for name, array in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("ir_version,opset,batchnorm", [(3, 9, True), (3, 9, False), (4, 13, True), (8, 13, False)])
def test_initializers_listed_as_inputs_are_defaults(tmp_path, ir_version, opset, batchnorm):
    model = conv_with_initializer_inputs(ir_version, opset, batchnorm)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(8, 1, 3, 8, 8)))
    result = api.quantize(path, data, load_recipe(INT8))
    assert [value.name for value in result.model.graph.input] == ["x"]
    assert result.model.ir_version >= 4
    assert result.report["plan"]["quantized_by_op"]["Conv"] == 1
    assert result.report["plan"]["weights"] == 1
    x = RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)
    expected, got = run_both(model, result.model, {"x": x})
    assert cosine(expected, got) > 0.999
    assert result.passed


def test_centerface_weights_listed_as_inputs_quantize():
    """IR 4, opset 9, all 194 initializers also graph inputs, BatchNorm to fold: quantized, not refused."""
    folder = shared_model("centerface")
    result = api.quantize(folder / "model.onnx", folder / "calib", load_recipe(INT8))
    assert any("194 graph inputs with an initializer" in note for note in result.report["prepare"])
    assert [value.name for value in result.model.graph.input] == ["input.1"]
    assert result.report["plan"]["quantized_by_op"]["Conv"] == 60
    assert result.report["kernels"]["integer_ops"]["QLinearConv"] >= 55
    assert all(output["cosine"] > 0.85 for output in result.report["validation"]["outputs"].values())
