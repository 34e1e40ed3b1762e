"""Model classes other quantizers break on: each is quantized correctly, or refused with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, make_model, save_npy_folder, shared_model, untimed_recipe
from qtool import api
from qtool.errors import ModelError
from qtool.recipe.load import load_recipe

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws the same weights and data whatever ran before it."""
    global RNG
    RNG = np.random.default_rng(0)


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
    result = api.quantize(path, data, load_recipe(untimed_recipe(tmp_path)))
    assert [value.name for value in result.model.graph.input] == ["x"]
    assert result.model.ir_version >= 4
    assert result.report["plan"]["quantized_by_op"]["Conv"] == 1
    assert result.report["plan"]["weights"] == 1
    x = RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)
    expected, got = run_both(model, result.model, {"x": x})
    assert cosine(expected, got) > 0.999
    assert result.passed


def test_centerface_weights_listed_as_inputs_quantize(tmp_path):
    """IR 4, opset 9, all 194 initializers also graph inputs, BatchNorm to fold: quantized, not refused."""
    folder = shared_model("centerface")
    result = api.quantize(folder / "model.onnx", folder / "calib", load_recipe(untimed_recipe(tmp_path)))
    assert any("194 graph inputs with an initializer" in note for note in result.report["prepare"])
    assert [value.name for value in result.model.graph.input] == ["input.1"]
    assert result.report["plan"]["quantized_by_op"]["Conv"] == 60
    assert result.report["kernels"]["integer_ops"]["QLinearConv"] >= 55
    assert all(output["cosine"] > 0.85 for output in result.report["validation"]["outputs"].values())


# --- MatMul with a constant weight that is not 2-D, producing a graph output -------------------

# x shape (after the batch), weight shape, y shape: per-head [H, K, N], batched [1, H, K, N], vector [K]
MATMUL_WEIGHTS = {"3-D": ((2, 4, 8), (2, 8, 5), (2, 4, 5)), "4-D": ((2, 4, 8), (1, 2, 8, 5), (2, 4, 5)),
                  "1-D": ((8,), (8,), ())}


def matmul_head(rank: str) -> onnx.ModelProto:
    x_shape, w_shape, y_shape = MATMUL_WEIGHTS[rank]
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="head")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", *y_shape])],
        {"w": RNG.normal(size=w_shape).astype(np.float32)},
    )


def quantize_model(tmp_path, model, recipe, samples):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = save_npy_folder(tmp_path / "data", samples)
    return api.quantize(path, data, load_recipe(recipe))


@pytest.mark.parametrize("rank", MATMUL_WEIGHTS)
def test_matmul_weight_that_is_not_2d_is_quantized_per_tensor(tmp_path, rank):
    """ORT's MatMulIntegerToFloat refuses per-channel scales on such a weight (exit 3 before)."""
    model = matmul_head(rank)
    x_shape = MATMUL_WEIGHTS[rank][0]
    result = quantize_model(tmp_path, model, untimed_recipe(tmp_path), RNG.normal(size=(8, 1, *x_shape)))
    weight_dq = next(node for node in result.model.graph.node
                     if node.op_type == "DequantizeLinear" and node.output[0].startswith("w"))
    assert not any(attr.name == "axis" for attr in weight_dq.attribute)  # per_tensor
    assert any(f"w: MatMul weight is {rank}, quantized per_tensor" in note for note in result.report["plan"]["notes"])
    assert result.report["kernels"]["integer_ops"] == {"MatMulIntegerToFloat": 1}
    x = RNG.normal(size=(3, *x_shape)).astype(np.float32)
    expected, got = run_both(model, result.model, {"x": x})
    assert cosine(expected, got) > 0.999


def test_matmul_2d_weight_keeps_per_channel_on_its_output_axis(tmp_path):
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="head")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5])],
        {"w": RNG.normal(size=(8, 5)).astype(np.float32)},
    )
    result = quantize_model(tmp_path, model, untimed_recipe(tmp_path), RNG.normal(size=(8, 1, 8)))
    weight_dq = next(node for node in result.model.graph.node
                     if node.op_type == "DequantizeLinear" and node.output[0].startswith("w"))
    assert [attr.i for attr in weight_dq.attribute if attr.name == "axis"] == [1]


@pytest.mark.parametrize("rank", ["3-D", "1-D"])
def test_weight_only_names_a_weight_that_is_not_2d(tmp_path, rank):
    """Its only MatMul left float, the run quantizes nothing: refused, naming why the node was passed over."""
    model = matmul_head(rank)
    with pytest.raises(ModelError, match=rf"nothing to quantize: .*\(MatMul×1: weight_only matmulnbits: "
                                         rf"weight is not 2-D \({rank}\)\)"):
        quantize_model(tmp_path, model, ROOT / "qtool" / "recipe" / "presets" / "w4-matmul.yaml",
                       RNG.normal(size=(8, 1, *MATMUL_WEIGHTS[rank][0])))


# --- models ONNX Runtime runs but onnx.checker refuses ----------------------------------------

@pytest.mark.parametrize("missing", ["shape", "type"])
def test_graph_output_without_shape_or_type_is_repaired_and_quantized(tmp_path, missing):
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None) if missing == "shape" \
        else onnx.ValueInfoProto(name="y")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "unchecked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [output],
        [numpy_helper.from_array(RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(onnx.checker.ValidationError, match=f"Field '{missing}'"):
        onnx.checker.check_model(model)
    result = quantize_model(tmp_path, model, untimed_recipe(tmp_path), RNG.normal(size=(8, 1, 3, 8, 8)))
    assert f"graph output 'y' had no {missing}: set from shape inference (onnx.checker requires it; " \
           "ONNX Runtime does not)" in result.report["prepare"]
    assert result.report["plan"]["quantized_by_op"] == {"Conv": 1, "Relu": 1}
    (y,) = result.model.graph.output
    assert [d.dim_param or d.dim_value for d in y.type.tensor_type.shape.dim] == ["N", 4, 8, 8]
    onnx.checker.check_model(result.model)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    expected, got = run_both(model, result.model, {"x": x})
    assert cosine(expected, got) > 0.999


# --- float16 / bfloat16 models ---------------------------------------------------------------

def half_cnn(elem: int, interface: int) -> onnx.ModelProto:
    """A small CNN computing in `elem` (FLOAT16/BFLOAT16, FLOAT: its float32 twin) with inputs and
    outputs of type `interface`: x [N, 3, 16, 16] → 2 × (Conv → Relu) → GlobalAveragePool → Gemm → y."""
    rng = np.random.default_rng(3)
    weights = {"w1": rng.normal(size=(8, 3, 3, 3)) * 0.3, "b1": rng.normal(size=8) * 0.1,
               "w2": rng.normal(size=(8, 8, 3, 3)) * 0.15, "b2": rng.normal(size=8) * 0.1,
               "fw": rng.normal(size=(8, 5)) * 0.5, "fb": rng.normal(size=5) * 0.1}
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=elem, name="cast_in")] if elem != interface else []
    nodes += [helper.make_node("Conv", ["xc" if nodes else "x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
              helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["yc" if elem != interface else "y"], name="fc")]
    if elem != interface:
        nodes.append(helper.make_node("Cast", ["yc"], ["y"], to=interface, name="cast_out"))
    # the same rounded values in every variant: float16 first, then the model's type
    rounded = {name: array.astype(np.float16).astype(np.float32) for name, array in weights.items()}
    initializers = [helper.make_tensor(name, elem, array.shape, array.ravel().tolist())
                    for name, array in rounded.items()]
    graph = helper.make_graph(nodes, "half_cnn", [helper.make_tensor_value_info("x", interface, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", interface, ["N", 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("elem,interface", [(TensorProto.FLOAT16, TensorProto.FLOAT16),
                                            (TensorProto.FLOAT16, TensorProto.FLOAT),
                                            (TensorProto.BFLOAT16, TensorProto.FLOAT)])
def test_half_precision_cnn_is_really_quantized(tmp_path, elem, interface):
    """Before: "0 of 7 nodes quantized, no float inputs to quantize", exit 0, the model untouched."""
    model = half_cnn(elem, interface)
    samples = np.random.default_rng(4).normal(size=(16, 1, 3, 16, 16))
    result = quantize_model(tmp_path, model, untimed_recipe(tmp_path), samples)
    kind = "float16" if elem == TensorProto.FLOAT16 else "bfloat16"
    assert any(note.startswith(f"{kind} model computed in a float32 working copy") for note in result.report["prepare"])
    assert result.report["plan"]["quantized_by_op"]["Conv"] == 2
    assert result.report["plan"]["quantized_by_op"]["Gemm"] == 1
    assert result.report["kernels"]["integer_ops"]["QLinearConv"] == 2
    # the interface is the model's own
    assert [v.type.tensor_type.elem_type for v in result.model.graph.input] == [interface]
    assert [v.type.tensor_type.elem_type for v in result.model.graph.output] == [interface]
    # against the float32 twin (same rounded weights): ORT has no bfloat16 Conv to run the original
    twin = half_cnn(TensorProto.FLOAT, TensorProto.FLOAT)
    x = np.random.default_rng(5).normal(size=(4, 3, 16, 16)).astype(np.float32)
    feed = x.astype(np.float16) if interface == TensorProto.FLOAT16 else x
    expected = ort.InferenceSession(twin.SerializeToString()).run(None, {"x": feed.astype(np.float32)})[0]
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": feed})[0]
    assert got.dtype == feed.dtype
    assert cosine(expected, got) > 0.999
