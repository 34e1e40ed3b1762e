"""`placement: fast`: groups whose integer kernels are estimated slower than float stay float (structure only)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import make_model, quantize_tiny, save_npy_folder
from qtool.errors import ModelError
from qtool.quantization.kernel_costs import SLOWER_PREFIX, node_costs, slower_regions

RNG = np.random.default_rng(0)
FAST = "version: 1\nquantization: {placement: fast}\n"


def first_layer(with_head: bool):
    """Conv 3->64 3x3 on 8x8 (27 products per output: a first layer, where the integer kernel's im2col does
    not pay), then with_head: Relu -> Flatten -> Gemm 4096->512 (where the integer kernel pays)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    initializers = {"w": RNG.normal(size=(64, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=64).astype(np.float32)}
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 64, 8, 8])
    if with_head:
        nodes += [helper.make_node("Relu", ["c"], ["r"], name="relu"),
                  helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
                  helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
        initializers.update(fw=RNG.normal(size=(512, 4096)).astype(np.float32), fb=RNG.normal(size=512).astype(np.float32))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512])
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [output],
                      initializers)


def test_fast_keeps_a_first_layer_conv_float_and_is_deterministic(tmp_path):
    model = first_layer(with_head=True)
    for name in ("fast", "again", "fused"):
        (tmp_path / name).mkdir()
    fast = quantize_tiny(tmp_path / "fast", model, FAST)
    producers = {out: node.op_type for node in fast.model.graph.node for out in node.output}
    conv = next(node for node in fast.model.graph.node if node.name == "conv")
    assert producers.get(conv.input[0]) != "DequantizeLinear" and conv.input[1] == "w"  # float input, float weight
    reasons = {node["node"]: node["reason"] for node in fast.report["plan"]["nodes"]}
    assert reasons["conv"].startswith(SLOWER_PREFIX) and "µs" in reasons["conv"]
    assert fast.report["kernels"]["integer_ops"].get("QGemm") == 1  # the head keeps its integer kernel
    again = quantize_tiny(tmp_path / "again", model, FAST)
    assert again.model.SerializeToString() == fast.model.SerializeToString()  # no timing: same bytes
    fused = quantize_tiny(tmp_path / "fused", model)  # placement fused quantizes the conv
    conv = next(node for node in fused.model.graph.node if node.name == "conv")
    assert {node.op_type for node in fused.model.graph.node if node.output[0] == conv.input[0]} == {"DequantizeLinear"}


def test_the_default_recipe_places_fast(tmp_path):
    """`placement: fast` is the default: with no placement named, the first-layer conv stays float for speed
    and the head keeps its integer kernel, as under `placement: fast` written out."""
    from qtool import api
    from qtool.recipe.schema import Recipe

    assert Recipe().quantization.placement == "fast"
    model = first_layer(with_head=True)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(16, 1, 3, 8, 8)))
    default = api.quantize(path, data, Recipe())
    reasons = {node["node"]: node["reason"] for node in default.report["plan"]["nodes"]}
    assert reasons["conv"].startswith(SLOWER_PREFIX)
    assert default.report["kernels"]["integer_ops"].get("QGemm") == 1


def test_fast_refuses_a_model_where_nothing_pays(tmp_path):
    """Every node estimated faster as float: exit 2 saying so, never an int8 model slower than float nor a
    float copy passed off as quantized."""
    with pytest.raises(ModelError, match=r"no 8-bit kernel pays here: .* quantizes \(1\) faster as float"):
        quantize_tiny(tmp_path, first_layer(with_head=False), FAST)


def conv_pool_conv():
    """Conv 64->64 3x3 on 32x32 -> MaxPool 2x2 -> Conv 64->64 3x3 on 16x16 (shapes given, no ORT run)."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32, 32])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 16, 16])],
                       {"w1": np.zeros((64, 64, 3, 3), np.float32), "w2": np.zeros((64, 64, 3, 3), np.float32)})
    shapes = {"x": (1, 64, 32, 32), "c1": (1, 64, 32, 32), "p": (1, 64, 16, 16), "y": (1, 64, 16, 16)}
    return model, shapes


def test_a_uint8_maxpool_goes_float_between_convs_that_pay():
    model, shapes = conv_pool_conv()
    groups = slower_regions(model.graph, ["conv1", "pool", "conv2"], shapes)
    assert [group.nodes for group in groups] == [("pool",)]  # the convs keep their integer kernels
    assert groups[0].float_us < groups[0].int8_us


def test_nothing_goes_float_where_every_kernel_pays():
    model, shapes = conv_pool_conv()
    assert slower_regions(model.graph, ["conv1", "conv2"], shapes) == []


def test_depthwise_convs_and_broadcast_muls_cost_more_as_integer_kernels():
    shapes = {"a": (1, 192, 20, 20), "d": (1, 192, 20, 20), "s": (1, 192, 1, 1), "m": (1, 192, 20, 20),
              "e": (1, 192, 20, 20), "c": (1, 192, 20, 20)}
    weights = {"wd": (192, 1, 3, 3), "wc": (192, 192, 1, 1)}
    depthwise = helper.make_node("Conv", ["a", "wd"], ["d"], group=192)
    broadcast = helper.make_node("Mul", ["a", "s"], ["m"])
    elementwise = helper.make_node("Mul", ["a", "d"], ["e"])
    pointwise = helper.make_node("Conv", ["a", "wc"], ["c"])
    for node in (depthwise, broadcast, elementwise):
        float_us, int8_us = node_costs(node, shapes, weights)
        assert int8_us > float_us, node.op_type
    assert node_costs(broadcast, shapes, weights)[1] > node_costs(elementwise, shapes, weights)[1]
    float_us, int8_us = node_costs(pointwise, shapes, weights)  # 14.7 M MACs: integer GEMM pays
    assert int8_us < float_us / 2
    assert node_costs(pointwise, {}, weights) == (0.0, 0.0)  # no shape, no estimate


def test_tune_and_sensitivity_place_fast_as_quantize_does(tmp_path):
    """The trials' plans carry out `placement: fast` on the same shapes quantize measures: the recipe as
    given, tuned, is what quantize gives byte for byte, and sensitivity ranks only the nodes fast quantizes.
    A recipe quantize refuses (nothing pays) is refused before any output is written."""
    from qtool.search import api as search_api

    path = tmp_path / "model.onnx"
    path.write_bytes(first_layer(with_head=True).SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(16, 1, 3, 8, 8)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAST + "validation:\n  gates: {min_cosine: 0.5}\n")
    tuned = search_api.tune(path, data, recipe, tmp_path / "tuned", latency_runs=0)
    assert tuned.report["chosen"]["trial"] == "recipe as given" and tuned.report["chosen"]["reproduced_by_quantize"]
    ranking = search_api.sensitivity(path, data, recipe, tmp_path / "sens")
    assert "conv" not in {row["node"] for row in ranking.rows} and "fc" in {row["node"] for row in ranking.rows}

    path.write_bytes(first_layer(with_head=False).SerializeToString())
    with pytest.raises(ModelError, match="no 8-bit kernel pays here"):
        search_api.tune(path, data, recipe, tmp_path / "refused", latency_runs=0)
    assert not (tmp_path / "refused").exists()
