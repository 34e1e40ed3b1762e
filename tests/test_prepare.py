"""Preparation passes keep the model's function."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import SAMPLE, make_model
from qtool.io.model import load_model
from qtool.quantization.prepare import constants_to_initializers, fold_batchnorm, prepare_model
from qtool.runtime.session import make_session, run


def outputs(model, feeds):
    return run(make_session(model, optimize=False), feeds)


def test_batchnorm_folded_into_conv_keeps_outputs():
    model = load_model(SAMPLE / "model.onnx")
    before = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    feeds = {"image": np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)}
    expected = outputs(model, feeds)["logits"]
    prepared, notes = prepare_model(model)
    assert before == 2
    assert not any(node.op_type == "BatchNormalization" for node in prepared.graph.node)
    assert "2 BatchNormalization nodes folded into Conv" in notes
    np.testing.assert_allclose(outputs(prepared, feeds)["logits"], expected, rtol=1e-4, atol=1e-5)


def test_constant_nodes_become_initializers():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1, 2, 3, 4])
    model = make_model(
        [helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    assert constants_to_initializers(model) == 1
    assert [init.name for init in model.graph.initializer] == ["w"]
    assert [node.op_type for node in model.graph.node] == ["MatMul"]
    np.testing.assert_allclose(outputs(model, {"x": np.ones((1, 2), np.float32)})["y"], [[4, 6]])


def test_batchnorm_not_folded_when_conv_output_is_shared():
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
         helper.make_node("Relu", ["c"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2, 4, 4])],
        {"w": rng.random((2, 1, 1, 1), dtype=np.float32), "g": np.ones(2, np.float32),
         "b": np.zeros(2, np.float32), "m": np.zeros(2, np.float32), "v": np.ones(2, np.float32)},
    )
    assert fold_batchnorm(model) == 0
    onnx.checker.check_model(model)


def test_paddle_style_bias_add_and_division_are_folded():
    """Conv → Add(Reshape(bias)) and x / 6 (hard-swish) become a Conv bias and a Mul."""
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Reshape", ["b", "shape"], ["b4"], name="reshape_bias"),
         helper.make_node("Add", ["c", "b4"], ["a"], name="bias_add"),
         helper.make_node("Div", ["a", "six"], ["y"], name="div")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
         "shape": np.array([1, 4, 1, 1], np.int64), "six": np.array(6.0, np.float32)},
    )
    feeds = {"x": rng.normal(size=(2, 3, 5, 5)).astype(np.float32)}
    expected = outputs(model, feeds)["y"]
    prepared, notes = prepare_model(model)
    assert [node.op_type for node in prepared.graph.node] == ["Conv", "Mul"]
    assert len(prepared.graph.node[0].input) == 3  # the Add became the Conv's bias
    assert "1 constant Adds after a Conv folded into its bias" in notes
    np.testing.assert_allclose(outputs(prepared, feeds)["y"], expected, rtol=1e-5, atol=1e-6)


def test_spatial_add_is_not_folded_into_bias():
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Add", ["c", "plane"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
         "plane": rng.normal(size=(1, 1, 5, 5)).astype(np.float32)},
    )
    prepared, _ = prepare_model(model)
    assert [node.op_type for node in prepared.graph.node] == ["Conv", "Add"]


def test_learnable_affine_after_conv_is_folded_without_touching_shared_weights():
    """PP-HGNet's Conv → Mul(scale) → Add(bias) becomes one Conv; a second Conv on the same weights keeps them."""
    rng = np.random.default_rng(3)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
         helper.make_node("Mul", ["scale", "c"], ["m"], name="affine_scale"),
         helper.make_node("Add", ["m", "shift"], ["y"], name="affine_shift"),
         helper.make_node("Conv", ["x", "w"], ["z"], name="twin")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 5, 5])],
        {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
         "scale": rng.normal(size=(1, 4, 1, 1)).astype(np.float32), "shift": np.array([0.7], np.float32)},
    )
    feeds = {"x": rng.normal(size=(2, 3, 5, 5)).astype(np.float32)}
    expected = outputs(model, feeds)
    prepared, notes = prepare_model(model)
    assert [node.op_type for node in prepared.graph.node] == ["Conv", "Conv"]
    assert "1 constant Muls after a Conv folded into its weights" in notes
    assert prepared.graph.node[1].input[1] == "w"  # the twin still reads the original weights
    for name, value in outputs(prepared, feeds).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-5)
