"""Where Q/DQ go, asserted structurally, and that ONNX Runtime fuses them into integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, quantize_tiny
from qtool.quantization.placement import fusion_graph
from qtool.runtime.session import optimized_op_histogram

RNG = np.random.default_rng(0)
ALL = "version: 1\nquantization: {placement: all}\n"  # every planned Q/DQ, fused by ORT or not


def conv_relu_pool_gemm(pool: str = "MaxPool"):
    """Conv → Relu → `pool` (MaxPool 2×2 or GlobalAveragePool, node "pool") → Flatten → Gemm."""
    attributes = {"kernel_shape": [2, 2], "strides": [2, 2]} if pool == "MaxPool" else {}
    features = 64 if pool == "MaxPool" else 4
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node(pool, ["r"], ["p"], name="pool", **attributes),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        {"w": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32),
         "fw": RNG.normal(size=(5, features)).astype(np.float32), "fb": RNG.normal(size=5).astype(np.float32)},
    )


def consumers_of_dq(model, op_type):
    """For each node of op_type, which of its inputs come from a DequantizeLinear."""
    producers = {out: node for node in model.graph.node for out in node.output}
    result = {}
    for node in model.graph.node:
        if node.op_type == op_type:
            result[node.name] = [producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                 for i in node.input]
    return result


def test_conv_relu_pool_gemm_placement(tmp_path):
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm())
    model = result.model
    # Conv reads dequantized input, weight and bias; Gemm likewise.
    assert consumers_of_dq(model, "Conv") == {"conv": [True, True, True]}
    assert consumers_of_dq(model, "Gemm") == {"fc": [True, True, True]}
    # The Conv output feeds only Relu: quantized after Relu, not before (ORT folds the Relu).
    quantized_tensors = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert "c" not in quantized_tensors and "r" in quantized_tensors
    # MaxPool and Flatten move data: their outputs reuse the Relu output's scale initializer.
    q_scale = {node.input[0]: node.input[1] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    assert q_scale["p"] == q_scale["r"] == q_scale["f"]
    # The graph output from Gemm stays float: ORT's QGemm writes float directly.
    assert "y" not in quantized_tensors
    # Weights are stored as int8, bias as int32.
    types = {init.name: init.data_type for init in model.graph.initializer}
    assert TensorProto.INT8 in types.values() and TensorProto.INT32 in types.values()
    assert not any(t == TensorProto.FLOAT and len(init.dims) == 4
                   for init, t in zip(model.graph.initializer, types.values()))


def test_ort_fuses_into_integer_kernels(tmp_path):
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm())
    ops = optimized_op_histogram(result.model)
    assert ops["QLinearConv"] == 1
    assert ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Gemm"] == 0
    assert result.report["kernels"]["integer_ops"] == {"QGemm": 1, "QLinearConv": 1}


def test_excluded_op_type_stays_float(tmp_path):
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm(),
                           "version: 1\nquantization:\n  exclude: {op_types: [Gemm]}\n")
    assert consumers_of_dq(result.model, "Gemm") == {"fc": [False, False, False]}
    decisions = {n["node"]: n for n in result.report["plan"]["nodes"]}
    assert decisions["fc"]["reason"] == "excluded: quantization.exclude.op_types"
    assert decisions["conv"]["quantized"]


def test_add_of_two_activations_and_unknown_op(tmp_path):
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a"),
         helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
         helper.make_node("Add", ["a", "b"], ["s"], name="add"),
         helper.make_node("Erf", ["s"], ["y"], name="erf")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w": RNG.normal(size=(4, 3, 1, 1)).astype(np.float32),
         "w2": RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)},
    )
    result = quantize_tiny(tmp_path, model)
    assert consumers_of_dq(result.model, "Add") == {"add": [True, True]}
    # Float consumers of a quantized tensor read it through Q/DQ too (ORT fuses only then).
    assert consumers_of_dq(result.model, "Erf") == {"erf": [True]}
    ops = optimized_op_histogram(result.model)
    assert ops["QLinearAdd"] == 1 and ops["QLinearConv"] == 2
    assert Counter(n["reason"] for n in result.report["plan"]["nodes"] if not n["quantized"]) == \
        {"op type not in the rule table": 1}


def test_degenerate_tensor_stays_float_with_a_note(tmp_path):
    model = make_model(
        # x - x: an all-zero activation (a constant ·0 would be folded into the Conv's weights)
        # and a Conv beside it with real ranges, so the run has something to quantize
        [helper.make_node("Sub", ["x", "x"], ["z"], name="zero_out"),
         helper.make_node("Conv", ["z", "w"], ["y"], name="conv"),
         helper.make_node("Conv", ["x", "w"], ["live"], name="live_conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8]),
         helper.make_tensor_value_info("live", TensorProto.FLOAT, ["N", 2, 8, 8])],
        {"w": RNG.normal(size=(2, 3, 1, 1)).astype(np.float32)},
    )
    result = quantize_tiny(tmp_path, model, ALL)
    assert any("z: degenerate range" in note for note in result.report["plan"]["notes"])
    assert all(np.isfinite(v) for o in result.report["validation"]["outputs"].values() for v in [o["cosine"]])


def test_dead_channel_bias_does_not_saturate_int32(tmp_path):
    """A channel with ~0 weights gets a ~0 scale; its int32 bias must still hold its value."""
    weight = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)
    weight[2] = 1e-26
    bias = np.array([0.1, -0.2, -0.012, 0.3], np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w": weight, "b": bias},
    )
    result = quantize_tiny(tmp_path, model)
    assert any("scale(s) raised so the int32 bias fits" in n for n in result.report["plan"]["notes"])
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    dequantized = inits["b_quantized"].astype(np.float64) * inits["b_scale"]
    assert np.all(np.abs(dequantized - bias) <= inits["b_scale"] / 2 + 1e-9)  # rounding error only
    assert abs(dequantized[2] - bias[2]) < 1e-6


def test_non_finite_constants_stay_float(tmp_path):
    weight = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)
    weight[1, 0, 0, 0] = np.nan
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
         helper.make_node("Mul", ["c", "mask"], ["y"], name="mul")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w": weight, "b": np.zeros(4, np.float32), "mask": np.array([1, np.inf, 1, 1], np.float32).reshape(1, 4, 1, 1)},
    )
    result = quantize_tiny(tmp_path, model, ALL)
    notes = result.report["plan"]["notes"]
    assert "w: holds NaN or infinite values, kept float" in notes
    assert "mask: holds NaN or infinite values, kept float" in notes
    assert consumers_of_dq(result.model, "Conv") == {"conv": [True, False, False]}
    assert {init.name for init in result.model.graph.initializer} >= {"w", "mask"}


def test_wide_types_keep_a_bias_that_int32_cannot_hold_out_of_ort_bias_quantization(tmp_path):
    """ORT quantizes a float Conv/Gemm bias to int32 at input x weight scale without a range check;
    with 16-bit activations and weights that scale is ~1e-10 and the bias would cast to -2^31."""
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
         helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="gemm", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        {"w": (0.01 * RNG.normal(size=(4, 3, 3, 3))).astype(np.float32), "b": np.array([5, -3, 2, 4], np.float32),
         "w2": (0.01 * RNG.normal(size=(5, 144))).astype(np.float32), "b2": np.full(5, 6, np.float32)},
    )
    result = quantize_tiny(tmp_path, model, "quantization:\n  activations: {dtype: uint16}\n"
                                            "  weights: {dtype: int16, granularity: per_channel}\n")
    adds = {node.name: node.input for node in result.model.graph.node if node.op_type == "Add"}
    assert set(adds) == {"conv_bias_add", "gemm_bias_add"}
    assert all(len(node.input) == 2 for node in result.model.graph.node if node.op_type in ("Conv", "Gemm"))
    kernels = result.report["validation"]["outputs"]["y"]["sqnr_db"]
    simulated = result.report["simulated"]["outputs"]["y"]["sqnr_db"]
    assert kernels > 60 and abs(kernels - simulated) < 1, (kernels, simulated)


def conv_hardsigmoid_conv():
    """x → Conv → Erf → HardSigmoid → Conv: ORT has no integer HardSigmoid kernel (nor Erf)."""
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Erf", ["c1"], ["e"], name="erf"),
         helper.make_node("HardSigmoid", ["e"], ["h"], name="hsig"),
         helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w1": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32), "b1": RNG.normal(size=4).astype(np.float32),
         "w2": RNG.normal(size=(4, 4, 3, 3)).astype(np.float32), "b2": RNG.normal(size=4).astype(np.float32)},
    )


def test_fused_placement_keeps_unfused_op_float(tmp_path):
    (tmp_path / "all").mkdir()
    everywhere = quantize_tiny(tmp_path / "all", conv_hardsigmoid_conv(), ALL).model
    assert consumers_of_dq(everywhere, "HardSigmoid") == {"hsig": [True]}
    (tmp_path / "fused").mkdir()
    result = quantize_tiny(tmp_path / "fused", conv_hardsigmoid_conv())  # quantize_tiny pins placement: fused
    # HardSigmoid has no integer kernel: it reads Erf's float output, no Q/DQ in front of it ...
    assert consumers_of_dq(result.model, "HardSigmoid") == {"hsig": [False]}
    # ... while both Convs still read dequantized input, weight and bias, and ORT fuses both.
    assert consumers_of_dq(result.model, "Conv") == {"conv1": [True, True, True], "conv2": [True, True, True]}
    assert optimized_op_histogram(result.model)["QLinearConv"] == 2
    quantized_tensors = {node.input[0] for node in result.model.graph.node if node.op_type == "QuantizeLinear"}
    assert "e" not in quantized_tensors and "e" in {n.input[0] for n in everywhere.graph.node
                                                    if n.op_type == "QuantizeLinear"}
    decisions = {n["node"]: n for n in result.report["plan"]["nodes"]}
    assert not decisions["hsig"]["quantized"] and "no integer kernel" in decisions["hsig"]["reason"]
    assert any(note.startswith("placement fused: 1 node(s)") for note in result.report["plan"]["notes"])


def test_leaky_relu_runs_as_an_integer_kernel(tmp_path):
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
         helper.make_node("LeakyRelu", ["c"], ["l"], name="leaky", alpha=0.1),
         helper.make_node("Conv", ["l", "w2", "b2"], ["y"], name="conv2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w": RNG.normal(size=(4, 3, 1, 1)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32),
         "w2": RNG.normal(size=(4, 4, 1, 1)).astype(np.float32), "b2": RNG.normal(size=4).astype(np.float32)},
    )
    result = quantize_tiny(tmp_path, model)
    assert consumers_of_dq(result.model, "LeakyRelu") == {"leaky": [True]}
    ops = optimized_op_histogram(result.model)
    assert ops["QLinearLeakyRelu"] == 1 and ops["LeakyRelu"] == 0
    assert result.report["validation"]["outputs"]["y"]["sqnr_db"] > 25


def conv_move_conv(move):
    """x → Conv → `move` (a data-movement node reading c, writing m) → Conv."""
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), move,
         helper.make_node("Conv", ["m", "w2", "b2"], ["y"], name="conv2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 4])],
        {"w": RNG.normal(size=(4, 3, 1, 1)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32),
         "w2": RNG.normal(size=(4, 4, 1, 1)).astype(np.float32), "b2": RNG.normal(size=4).astype(np.float32),
         "starts": np.array([0], np.int64), "ends": np.array([4], np.int64), "axes": np.array([3], np.int64)},
    )


def assert_moves_integers(tmp_path, op_type, move):
    """The data-movement node reads and writes the Conv output's scale, and ORT runs it on uint8 between
    two QLinearConv (no DequantizeLinear left in front of it)."""
    result = quantize_tiny(tmp_path, conv_move_conv(move))
    assert consumers_of_dq(result.model, op_type)[move.name][0] is True
    q_scale = {node.input[0]: node.input[1] for node in result.model.graph.node if node.op_type == "QuantizeLinear"}
    assert q_scale["m"] == q_scale["c"]
    graph = fusion_graph(result.model)
    producer = {out: node.op_type for node in graph.node for out in node.output}
    [moved] = [node for node in graph.node if node.op_type == op_type]
    assert producer[moved.input[0]] == "QLinearConv"
    assert [node.op_type for node in graph.node].count("QLinearConv") == 2


def test_slice_moves_integers(tmp_path):
    assert_moves_integers(tmp_path, "Slice", helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["m"],
                                                              name="slice"))



def test_fused_placement_keeps_an_integer_island_float(tmp_path):
    """Conv -> Erf, Erf -> Add -> Erf: ORT would run QLinearAdd between Quantize and Dequantize of float
    values. (The Conv keeps the run quantizing something: a model left all float is refused.)"""
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Erf", ["c"], ["e1"], name="erf1"),
         helper.make_node("Erf", ["e1"], ["e2"], name="erf2"),
         helper.make_node("Add", ["e1", "e2"], ["s"], name="add"),
         helper.make_node("Erf", ["s"], ["y"], name="erf3")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
        {"w": np.random.default_rng(0).normal(size=(3, 3, 3, 3)).astype(np.float32)},
    )
    (tmp_path / "all").mkdir()
    everywhere = quantize_tiny(tmp_path / "all", model, ALL)
    assert consumers_of_dq(everywhere.model, "Add") == {"add": [True, True]}
    assert optimized_op_histogram(everywhere.model)["QLinearAdd"] == 1
    (tmp_path / "fused").mkdir()
    result = quantize_tiny(tmp_path / "fused", model)
    assert consumers_of_dq(result.model, "Add") == {"add": [False, False]}
    assert optimized_op_histogram(result.model)["QLinearConv"] == 1
    decisions = {n["node"]: n for n in result.report["plan"]["nodes"]}
    assert "conversions cost more than the integer Add saves" in decisions["add"]["reason"]


def test_fused_placement_keeps_a_relu_between_float_nodes_float(tmp_path):
    """Conv -> Erf -> Relu -> Erf: the Relu's Q/DQ pair has no integer kernel on either side (ORT would drop
    the Relu and run the pair as two roundings); ppocr_det's BatchNormalization -> Relu -> ConvTranspose."""
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Erf", ["c"], ["e"], name="erf1"),
         helper.make_node("Relu", ["e"], ["r"], name="relu"),
         helper.make_node("Erf", ["r"], ["y"], name="erf2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
        {"w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32)},
    )
    quantized_inputs = lambda m: {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}  # noqa: E731
    (tmp_path / "all").mkdir()
    assert "r" in quantized_inputs(quantize_tiny(tmp_path / "all", model, ALL).model)
    (tmp_path / "fused").mkdir()
    result = quantize_tiny(tmp_path / "fused", model)
    assert "r" not in quantized_inputs(result.model) and "e" not in quantized_inputs(result.model)
    assert consumers_of_dq(result.model, "Relu") == {"relu": [False]}
    assert optimized_op_histogram(result.model)["QLinearConv"] == 1
    decisions = {n["node"]: n for n in result.report["plan"]["nodes"]}
    assert "Relu between float nodes" in decisions["relu"]["reason"]


def test_a_tensor_only_float_convs_read_has_no_unread_dequantize(tmp_path):
    """conv_q (quantized) -> q -> conv_float (kept float): conv_float reads q through the per-channel
    DequantizeLinear that keeps ORT from quantizing its weight; the plain one would be read by nothing,
    and ORT runs it all the same."""
    conv = lambda name, x, y: helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, pads=[1, 1, 1, 1])
    model = make_model(
        [conv("conv_q", "x", "q"), conv("conv_float", "q", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
        {f"{name}.w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32) for name in ("conv_q", "conv_float")})
    result = quantize_tiny(tmp_path, model, "version: 1\nquantization:\n  overrides:\n"
                                            "    - {match: {name: '^conv_float$'}, float: true}\n")
    graph = result.model.graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    dequantize = [node for node in graph.node if node.op_type == "DequantizeLinear"]
    assert dequantize and all(node.output[0] in read for node in dequantize)
    assert consumers_of_dq(result.model, "Conv")["conv_float"] == [True, False]
    assert optimized_op_histogram(result.model)["QLinearConv"] == 1


def float_and_quantized_readers():
    """x → conv_a (float) → a; a → conv_q (quantized) → q → conv_after_q (float) → y2;
    a → conv_float (float) → y1. Every Conv 3×3, 3 channels, pads 1."""
    conv = lambda name, x, y: helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, pads=[1, 1, 1, 1])
    weights = {f"{name}.w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32)
               for name in ("conv_a", "conv_q", "conv_after_q", "conv_float")}
    return make_model(
        [conv("conv_a", "x", "a"), conv("conv_q", "a", "q"), conv("conv_after_q", "q", "y2"),
         conv("conv_float", "a", "y1")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3, 8, 8])],
        weights)


def test_float_node_reads_a_float_producers_output_unrounded(tmp_path):
    """`a` is quantized for conv_q, yet conv_float reads it as conv_a wrote it: its output is the
    float model's exactly. conv_after_q reads conv_q's output through Q/DQ, which ORT needs to run
    conv_q as QLinearConv."""
    import onnxruntime as ort

    model = float_and_quantized_readers()
    # bias_correction off: where it is measured to pay (7-bit weights, CPUs without VNNI) it adds conv_q a bias
    recipe = ("version: 1\nquantization:\n  algorithms: {bias_correction: false}\n  overrides:\n"
              "    - {match: {name: '^conv_(a|float|after_q)$'}, float: true}\n")
    result = quantize_tiny(tmp_path, model, recipe)
    assert consumers_of_dq(result.model, "Conv") == {
        "conv_a": [False, False], "conv_q": [True, True], "conv_after_q": [True, False], "conv_float": [False, False]}
    assert optimized_op_histogram(result.model)["QLinearConv"] == 1
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    float_y1, float_y2 = run(model)
    quant_y1, quant_y2 = run(result.model)
    np.testing.assert_array_equal(quant_y1, float_y1)
    assert not np.array_equal(quant_y2, float_y2)  # conv_q's path is quantized


def test_float_conv_between_quantized_neighbours_stays_float_in_ort(tmp_path):
    """ONNX Runtime quantizes a float Conv's weight itself (per tensor) when a DequantizeLinear feeds
    it and a QuantizeLinear reads it; the Conv the recipe keeps float must run as float Conv."""
    conv = lambda name, x, y: helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, pads=[1, 1, 1, 1])
    weights = {f"{name}.w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32) for name in ("first", "middle", "last")}
    model = make_model(
        [conv("first", "x", "a"), conv("middle", "a", "b"), conv("last", "b", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])], weights)
    result = quantize_tiny(tmp_path, model, "version: 1\nquantization:\n  overrides:\n"
                                            "    - {match: {name: '^middle$'}, float: true}\n")
    ops = optimized_op_histogram(result.model)
    assert (ops["QLinearConv"], ops["Conv"]) == (2, 1)


def test_a_float_node_ort_fuses_into_an_integer_kernel_is_named(tmp_path):
    """GlobalAveragePool kept float between a quantized Relu and a quantized Gemm: ORT fuses its
    DequantizeLinear -> GlobalAveragePool -> QuantizeLinear into QLinearGlobalAveragePool anyway."""
    model = conv_relu_pool_gemm("GlobalAveragePool")
    floats = "version: 1\nquantization:\n  overrides:\n    - {match: {name: '^pool$'}, float: true}\n"
    (tmp_path / "gap").mkdir()
    (tmp_path / "plain").mkdir()
    fused = quantize_tiny(tmp_path / "gap", model, floats)
    assert optimized_op_histogram(fused.model)["QLinearGlobalAveragePool"] == 1
    assert any(w.startswith("1 node(s) the plan keeps float run as integer kernels")
               and "pool (QLinearGlobalAveragePool)" in w for w in fused.report["warnings"])
    plain = quantize_tiny(tmp_path / "plain", model)
    assert not any("keeps float run as integer kernels" in w for w in plain.report["warnings"])


def test_quantize_reads_the_optimized_graph_once(tmp_path, monkeypatch):
    """The kernels section and the 'kept float, runs as integer' warning read one optimized graph: no
    extra EXTENDED-level session after the placement pass (with placement all, main built one)."""
    import qtool.quantization.placement as placement

    calls = []
    real = placement.fusion_graph
    monkeypatch.setattr(placement, "fusion_graph", lambda model: calls.append(1) or real(model))
    floats = ("version: 1\nquantization:\n  placement: all\n  overrides:\n"
              "    - {match: {name: '^pool$'}, float: true}\n")
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm("GlobalAveragePool"), floats)
    assert calls == [] and result.report["kernels"]["integer_ops"]["QLinearGlobalAveragePool"] == 1
    assert any("pool (QLinearGlobalAveragePool)" in w for w in result.report["warnings"])


def test_an_override_that_matches_no_node_is_named(tmp_path):
    recipe = ("version: 1\nquantization:\n  overrides:\n    - {match: {op_type: Cnov}, float: true}\n"
              "    - {match: {op_type: Conv}, float: true}\n")
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm(), recipe)
    unmatched = [w for w in result.report["warnings"] if "matches no node" in w]
    assert unmatched == ["overrides[0] (op_type 'Cnov') matches no node of the model: it does nothing "
                         "(`qtool inspect MODEL` lists the node names and op types)"]


def test_an_exclude_entry_that_matches_no_node_is_named_as_an_override_is(tmp_path):
    """Finding 6: `exclude: {op_types: [Convv], nodes: ['^model/conv2d_99/.*']}` was a silent no-op."""
    recipe = ("version: 1\nquantization:\n  exclude:\n    op_types: [Convv, Relu]\n"
              "    nodes: ['^model/conv2d_99/.*', 'pool']\n")
    result = quantize_tiny(tmp_path, conv_relu_pool_gemm(), recipe)
    unmatched = [w for w in result.report["warnings"] if "matches no node" in w]
    assert unmatched == [f"{what} matches no node of the model: it does nothing (`qtool inspect MODEL` lists "
                         "the node names and op types)"
                         for what in ("exclude.op_types[0] ('Convv')", "exclude.nodes[0] ('^model/conv2d_99/.*')")]


def stem_with_hard_swish():
    """x -> conv_a -> a; a * clip(a + 3, 0, 6) -> m (the 1/6 already in conv_b, as prepare leaves it);
    m - 0.5 -> s -> conv_b (pads 1) -> b; b -> conv_q -> y and b -> Erf -> e (float: b as conv_b wrote it)."""
    conv = lambda name, x, y: helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, pads=[1, 1, 1, 1])  # noqa: E731
    return make_model(
        [conv("conv_a", "x", "a"),
         helper.make_node("Add", ["a", "three"], ["a3"], name="add3"),
         helper.make_node("Clip", ["a3", "zero", "six"], ["r6"], name="clip"),
         helper.make_node("Mul", ["a", "r6"], ["m"], name="mul"),
         helper.make_node("Add", ["m", "shift"], ["s"], name="shift_add"),
         conv("conv_b", "s", "b"), conv("conv_q", "b", "y"), helper.make_node("Erf", ["b"], ["e"], name="erf")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 8, 8, 8]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        {"conv_a.w": RNG.normal(size=(8, 3, 3, 3)).astype(np.float32),
         "conv_b.w": RNG.normal(size=(8, 8, 3, 3)).astype(np.float32) / 6,
         "conv_q.w": RNG.normal(size=(8, 8, 3, 3)).astype(np.float32),
         "three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
         "shift": np.array(-0.5, np.float32)})


def test_a_float_hard_swish_runs_as_one_hard_swish(tmp_path):
    """Kept float (keep_float's stem), the written-out hard-swish becomes HardSwish, its factor 6 carried through
    the scalar Add (-0.5 / 6) into conv_b's weights; conv_b's output is the float model's."""
    import onnxruntime as ort

    model = stem_with_hard_swish()
    floats = "version: 1\nquantization:\n  overrides:\n    - {match: {name: '^(conv_a|add3|clip|mul|shift_add|conv_b)$'}, float: true}\n"
    result = quantize_tiny(tmp_path, model, floats)
    ops = Counter(node.op_type for node in result.model.graph.node)
    assert (ops["HardSwish"], ops["Clip"], ops["Mul"]) == (1, 0, 0)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv_b = next(node for node in result.model.graph.node if node.name == "conv_b")
    np.testing.assert_allclose(inits[conv_b.input[1]], numpy_helper.to_array(model.graph.initializer[1]) * 6, rtol=1e-6)
    shift = next(node for node in result.model.graph.node if node.name == "shift_add")
    assert [inits.get(name) for name in shift.input if name in inits] == [np.float32(-0.5 / 6)]
    assert optimized_op_histogram(result.model)["QLinearConv"] == 1
    assert any("1 hard-swish(es)" in note for note in result.report["plan"]["notes"])
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["e"], {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(result.model), run(model), rtol=1e-4, atol=1e-4)


def test_float_conv_after_a_quantized_maxpool_stays_float_in_ort(tmp_path):
    """ORT moves a per-tensor DequantizeLinear down through a MaxPool, then quantizes the float Conv
    after it (WeightBiasQuantization): speech_embedding with conv2d_3/7/11/15 excluded ran all four as
    QLinearConv while the report called them float."""
    conv = lambda name, x, y: helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, pads=[1, 1, 1, 1])
    weights = {f"{name}.w": RNG.normal(size=(3, 3, 3, 3)).astype(np.float32) for name in ("first", "middle", "last")}
    model = make_model(
        [conv("first", "x", "a"), helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2]),
         conv("middle", "p", "b"), conv("last", "b", "y")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 7, 7])], weights)
    result = quantize_tiny(tmp_path, model, "version: 1\nquantization:\n  overrides:\n"
                                            "    - {match: {name: '^middle$'}, float: true}\n")
    assert result.report["plan"]["quantized_by_op"] == {"Conv": 2, "MaxPool": 1}
    ops = optimized_op_histogram(result.model)
    assert (ops["QLinearConv"], ops["Conv"]) == (2, 1)
