"""Preparation passes keep the model's function."""

from __future__ import annotations

import numpy as np
import pytest
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


def _hardswish_affine_conv(pads, group, channels=4, seed=0):
    """x → Conv → hard-swish (x·clip(x+3, 0, 6)/6) → ·a + b (PP-LCNetV3's learnable affine) → Conv(pads,
    group): the constants before the second Conv fold into it; `pads` decides whether the Add can."""
    rng = np.random.default_rng(seed)
    per_group = channels // group
    return make_model(
        [helper.make_node("Conv", ["x", "w0"], ["c"], name="conv0"),
         helper.make_node("Add", ["c", "three"], ["c3"], name="add3"),
         helper.make_node("Clip", ["c3", "zero", "six"], ["clip"], name="clip"),
         helper.make_node("Mul", ["c", "clip"], ["hs6"], name="hs"),
         helper.make_node("Div", ["hs6", "six"], ["hs"], name="div6"),
         helper.make_node("Mul", ["hs", "a"], ["scaled"], name="affine_mul"),
         helper.make_node("Add", ["b", "scaled"], ["shifted"], name="affine_add"),  # constant first
         helper.make_node("Conv", ["shifted", "w1", "b1"], ["y"], name="conv1", pads=[pads] * 4, group=group)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, None, None])],
        {"w0": rng.normal(size=(channels, 3, 1, 1)).astype(np.float32),
         "three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
         "a": rng.uniform(0.5, 1.5, size=(1, channels, 1, 1)).astype(np.float32),
         "b": rng.normal(size=(1, channels, 1, 1)).astype(np.float32),
         "w1": rng.normal(size=(channels, per_group, 3, 3)).astype(np.float32),
         "b1": rng.normal(size=channels).astype(np.float32)},
    )


@pytest.mark.parametrize("pads, group", [(0, 1), (0, 4), (1, 1), (1, 2), (1, 4)])
def test_constants_before_a_conv_fold_into_it_and_keep_its_function(pads, group):
    """The /6, ·a and +b between a hard-swish and the next Conv are three more 8-bit roundings once
    quantized; folded into that Conv they are none. A Conv that pads cannot take the +b (its border
    would see 0, not b): it is moved before the ·a, which still folds, and stays."""
    model = _hardswish_affine_conv(pads, group)
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32) * 3}
    expected = outputs(model, feeds)["y"]
    prepared, notes = prepare_model(model)
    ops = [node.op_type for node in prepared.graph.node]
    assert ops.count("Conv") == 2 and "Div" not in ops
    assert ops.count("Mul") == 1  # only the hard-swish's x·clip: /6 and ·a went into conv1's weights
    assert ops.count("Add") == (1 if pads == 0 else 2)  # the +3, and +b/a where conv1 pads
    assert any("before a Conv folded into its weights and bias" in note for note in notes)
    np.testing.assert_allclose(outputs(prepared, feeds)["y"], expected, rtol=1e-4, atol=1e-4)


def test_a_constant_read_by_a_conv_and_another_op_is_not_folded():
    """Folding into the Conv would change what the other reader sees."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Mul", ["x", "a"], ["m"], name="mul"),
         helper.make_node("Conv", ["m", "w"], ["y"], name="conv"),
         helper.make_node("Relu", ["m"], ["r"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 2, 4, 4])],
        {"a": np.array(0.5, np.float32), "w": rng.normal(size=(3, 2, 1, 1)).astype(np.float32)},
    )
    prepared, _ = prepare_model(model)
    assert [node.op_type for node in prepared.graph.node] == ["Mul", "Conv", "Relu"]
