"""`placement: fast`: groups whose integer kernels are estimated slower than float stay float (structure only)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import FUSED, make_model, save_npy_folder
from qtool.errors import ModelError
from qtool.quantization.kernel_costs import KEPT_FOR_SPEED, conversion_us, node_costs, slower_regions

RNG = np.random.default_rng(0)
FAST = "version: 1\nquantization: {placement: fast}\n"


def first_layer(with_head: bool):
    """Conv 3->64 3x3 on 32x32 (27 products per output: a first layer, where the integer kernel's im2col does
    not pay: 36 µs float, 65 µs as 8-bit, conversions included, measured), then with_head: Relu -> Conv 64->64
    3x3 (38 M MACs, where the integer kernel pays)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    initializers = {"w": RNG.normal(size=(64, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=64).astype(np.float32)}
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 64, 32, 32])
    if with_head:
        nodes += [helper.make_node("Relu", ["c"], ["r"], name="relu"),
                  helper.make_node("Conv", ["r", "hw"], ["y"], name="head", pads=[1, 1, 1, 1])]
        initializers.update(hw=(RNG.normal(size=(64, 64, 3, 3)) / 24).astype(np.float32))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 32, 32])
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])], [output],
                      initializers)


def quantize_first_layer(tmp_path, model, recipe_text: str | None = FAST):
    """`model` quantized with `recipe_text` (None: the default recipe) on 8 seeded [1, 3, 32, 32] samples."""
    from qtool import api
    from qtool.recipe.load import load_recipe
    from qtool.recipe.schema import Recipe

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(0).normal(size=(8, 1, 3, 32, 32)))
    recipe = Recipe()
    if recipe_text is not None:
        (tmp_path / "recipe.yaml").write_text(recipe_text)
        recipe = load_recipe(tmp_path / "recipe.yaml")
    return api.quantize(path, data, recipe)


def wiring(graph, name: str) -> tuple[str | None, str | None]:
    """The op types of the node writing node `name`'s first input and of one reading its first output."""
    producers = {out: node.op_type for node in graph.node for out in node.output}
    readers = {tensor: node.op_type for node in graph.node for tensor in node.input}
    node = next(node for node in graph.node if node.name == name)
    return producers.get(node.input[0]), readers.get(node.output[0])


def test_fast_keeps_a_first_layer_conv_float_and_is_deterministic(tmp_path):
    model = first_layer(with_head=True)
    fast = quantize_first_layer(tmp_path / "fast", model)
    producers = {out: node.op_type for node in fast.model.graph.node for out in node.output}
    conv = next(node for node in fast.model.graph.node if node.name == "conv")
    assert producers.get(conv.input[0]) != "DequantizeLinear" and conv.input[1] == "w"  # float input, float weight
    reasons = {node["node"]: node["reason"] for node in fast.report["plan"]["nodes"]}
    assert reasons["conv"].startswith(KEPT_FOR_SPEED) and "µs" in reasons["conv"]
    assert any(note.startswith("placement fast: 1 node(s) kept float") and "slower than float" in note
               for note in fast.report["plan"]["notes"])  # it said "placement fused" under fast too
    assert fast.report["kernels"]["integer_ops"].get("QLinearConv") == 1  # the head keeps its integer kernel
    again = quantize_first_layer(tmp_path / "again", model)
    assert again.model.SerializeToString() == fast.model.SerializeToString()  # no timing: same bytes
    fused = quantize_first_layer(tmp_path / "fused", model, FUSED)  # placement fused quantizes the conv
    conv = next(node for node in fused.model.graph.node if node.name == "conv")
    assert {node.op_type for node in fused.model.graph.node if node.output[0] == conv.input[0]} == {"DequantizeLinear"}


def test_the_default_recipe_places_fast(tmp_path):
    """`placement: fast` is the default: with no placement named, the first-layer conv stays float for speed
    and the head keeps its integer kernel, as under `placement: fast` written out."""
    from qtool.recipe.schema import Recipe

    assert Recipe().quantization.placement == "fast"
    default = quantize_first_layer(tmp_path, first_layer(with_head=True), None)
    reasons = {node["node"]: node["reason"] for node in default.report["plan"]["nodes"]}
    assert reasons["conv"].startswith(KEPT_FOR_SPEED)
    assert default.report["kernels"]["integer_ops"].get("QLinearConv") == 1


def test_fast_refuses_a_model_where_nothing_pays(tmp_path):
    """Every node estimated faster as float: exit 2 saying so, never an int8 model slower than float nor a
    float copy passed off as quantized."""
    with pytest.raises(ModelError, match=r"no 8-bit kernel pays here: .* quantizes \(1\) faster as float"):
        quantize_first_layer(tmp_path, first_layer(with_head=False))


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


def test_a_uint8_maxpool_goes_float_with_the_conv_reading_it():
    """A MaxPool kept float leaves its output without the range it shared with its input: the conv reading it
    loses its integer kernel too, and the group says so (the first conv keeps its own)."""
    model, shapes = conv_pool_conv()
    groups = slower_regions(model.graph, ["conv1", "pool", "conv2"], shapes)
    assert [group.nodes for group in groups] == [("pool", "conv2")]
    assert groups[0].float_us < groups[0].int8_us


def test_nothing_goes_float_where_every_kernel_pays():
    model, shapes = conv_pool_conv()
    assert slower_regions(model.graph, ["conv1", "conv2"], shapes) == []


def test_integer_kernels_saving_less_than_the_table_can_tell_go_float_and_say_so():
    """conv1 saves ~400 µs as an integer kernel: kept on its own, but beside a float Sigmoid of 33.5 M
    elements (~13 ms) that is under MIN_GAIN of the model's time, so it goes float as a group marked with
    the float model's time (placement's "not measurably faster" reason, not "slower than float")."""
    from qtool.quantization.kernel_costs import MIN_GAIN

    model, shapes = conv_pool_conv()
    big = (1, 64, 1024, 512)
    graph = make_model([*model.graph.node, helper.make_node("Sigmoid", ["z"], ["s"], name="sigmoid")],
                       [*model.graph.input, helper.make_tensor_value_info("z", TensorProto.FLOAT, list(big))],
                       [*model.graph.output, helper.make_tensor_value_info("s", TensorProto.FLOAT, list(big))],
                       {init.name: np.zeros(tuple(init.dims), np.float32) for init in model.graph.initializer}).graph
    assert slower_regions(model.graph, ["conv1"], shapes) == []
    [left] = slower_regions(graph, ["conv1"], {**shapes, "z": big, "s": big})
    assert left.nodes == ("conv1",) and left.float_us - left.int8_us > 300
    assert 0 < left.float_us - left.int8_us < MIN_GAIN * left.model_float_us


def test_one_excluded_conv_leaves_speech_embedding_integer_where_it_runs_faster(tmp_path):
    """A new user excluded one middle Conv of speech_embedding: the 35 integer nodes left were estimated to
    save 9 % (537 vs 615 µs), under the 10 % MIN_GAIN was, so `fast` refused the model, saying "integer
    kernels slower than float" of a group estimated faster. Quantized anyway it ran at 0.83x float. Under
    MIN_GAIN 5 % they stay integer."""
    from conftest import shared_model
    from qtool import api

    folder = shared_model("speech_embedding")
    (tmp_path / "recipe.yaml").write_text("version: 1\nquantization:\n"
                                          "  exclude: {nodes: ['^model/conv2d_10/Conv2D$']}\n")
    facts = api.inspect(folder / "model.onnx", tmp_path / "recipe.yaml", folder / "calib")
    assert not [p for p in facts.problems if p.action == "refuse"], facts.problems
    quantized = [d for d in facts.decisions if d.quantized]
    assert len(quantized) >= 30 and not any(d.reason.startswith(KEPT_FOR_SPEED + " not") for d in facts.decisions)


def test_depthwise_convs_and_broadcast_muls_cost_more_as_integer_kernels_on_a_text_line():
    """ppocr_cls's shapes (3 rows of 96): depthwise QLinearConv 2-3.5x float, broadcast QLinearMul 1.5-1.9x,
    elementwise QLinearMul ~1.3x (profiled); a 1x1 Conv of 14.7 M MACs pays as an integer GEMM."""
    shapes = {"a": (1, 88, 3, 96), "d": (1, 88, 3, 96), "s": (1, 88, 1, 1), "m": (1, 88, 3, 96), "e": (1, 88, 3, 96),
              "b": (1, 192, 20, 20), "c": (1, 192, 20, 20)}
    weights = {"wd": (88, 1, 5, 5), "wc": (192, 192, 1, 1)}
    depthwise = helper.make_node("Conv", ["a", "wd"], ["d"], group=88, kernel_shape=[5, 5], pads=[2, 2, 2, 2])
    broadcast = helper.make_node("Mul", ["a", "s"], ["m"])
    elementwise = helper.make_node("Mul", ["a", "d"], ["e"])
    pointwise = helper.make_node("Conv", ["b", "wc"], ["c"])
    for node in (depthwise, broadcast, elementwise):
        float_us, int8_us = node_costs(node, shapes, weights)
        assert int8_us > float_us, node.op_type
    float_us, int8_us = node_costs(depthwise, shapes, weights)
    assert int8_us > 1.8 * float_us
    float_us, int8_us = node_costs(pointwise, shapes, weights)  # 14.7 M MACs: integer GEMM pays
    assert int8_us < float_us / 2
    assert node_costs(pointwise, {}, weights) == (0.0, 0.0)  # no shape, no estimate


def test_a_broadcast_mul_costs_its_integer_kernel_more_per_pixel():
    """QLinearMul by a [C] vector in the NHWC chain restarts the broadcast at every pixel: ppocr_det's
    [80, 80, 24] x [24] ran 257 µs, its [40, 40, 96] x [96] (as many elements) 82 µs."""
    node = helper.make_node("Mul", ["a", "s"], ["m"])
    many = node_costs(node, {"a": (1, 24, 80, 80), "s": (1, 24, 1, 1), "m": (1, 24, 80, 80)}, {})
    few = node_costs(node, {"a": (1, 96, 40, 40), "s": (1, 96, 1, 1), "m": (1, 96, 40, 40)}, {})
    assert many[0] == few[0] and many[1] > 2 * few[1]


def test_tune_and_sensitivity_place_fast_as_quantize_does(tmp_path):
    """The trials' plans carry out `placement: fast` on the same shapes quantize measures: the recipe as
    given, tuned, is what quantize gives byte for byte, and sensitivity ranks only the nodes fast quantizes.
    A recipe quantize refuses (nothing pays) is refused before any output is written."""
    from qtool.search import api as search_api

    path = tmp_path / "model.onnx"
    path.write_bytes(first_layer(with_head=True).SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(8, 1, 3, 32, 32)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FAST + "validation:\n  gates: {min_cosine: 0.5}\n")
    tuned = search_api.tune(path, data, recipe, tmp_path / "tuned", latency_runs=0)
    assert tuned.report["chosen"]["trial"] == "recipe as given" and tuned.report["chosen"]["reproduced_by_quantize"]
    ranking = search_api.sensitivity(path, data, recipe, tmp_path / "sens")
    assert "conv" not in {row["node"] for row in ranking.rows} and "head" in {row["node"] for row in ranking.rows}

    path.write_bytes(first_layer(with_head=False).SerializeToString())
    with pytest.raises(ModelError, match="no 8-bit kernel pays here"):
        search_api.tune(path, data, recipe, tmp_path / "refused", latency_runs=0)
    assert not (tmp_path / "refused").exists()
def conv_resize_conv(mode: str):
    """x [N, 64, 16, 16] -> conv1 3x3 -> c (a graph output too: dequantized for it either way) -> Resize `mode` x2
    -> conv2 3x3 on 32x32 -> y."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["r"], name="resize", mode=mode),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    weights = {name: (RNG.normal(size=(64, 64, 3, 3)) / 24).astype(np.float32) for name in ("w1", "w2")}
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 32, 32]),
                       helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 64, 16, 16])],
                      {**weights, "scales": np.array([1, 1, 2, 2], np.float32)})


def test_a_linear_resize_costs_its_float_op_and_conversions_a_nearest_one_its_uint8_kernel():
    """ONNX Runtime has no integer linear Resize: planned 8-bit, it runs DequantizeLinear -> float Resize ->
    QuantizeLinear (u2netp's profiles); a nearest Resize runs as a uint8 Resize (ppocr_det's)."""
    shapes = {"c": (1, 64, 16, 16), "r": (1, 64, 32, 32)}
    for mode in ("linear", "cubic"):
        float_us, int8_us = node_costs(conv_resize_conv(mode).graph.node[1], shapes, {})
        assert int8_us == pytest.approx(float_us + conversion_us(64 * 16 * 16) + conversion_us(64 * 32 * 32))
    nearest_float_us, nearest_int8_us = node_costs(conv_resize_conv("nearest").graph.node[1], shapes, {})
    assert nearest_float_us < float_us and nearest_float_us < nearest_int8_us


def test_fast_keeps_a_linear_resize_between_convs_quantized(tmp_path):
    """Kept float, the linear Resize would save only a DequantizeLinear and take conv2's integer kernel with it
    (its output has no range of its own): under `placement: fast` it stays between Q/DQ, both convs integer."""
    from qtool import api
    from qtool.recipe.schema import Recipe

    path = tmp_path / "model.onnx"
    path.write_bytes(conv_resize_conv("linear").SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(8, 1, 64, 16, 16)))
    result = api.quantize(path, data, Recipe())
    assert wiring(result.model.graph, "resize") == ("DequantizeLinear", "QuantizeLinear")
    reasons = {node["node"]: node["reason"] for node in result.report["plan"]["nodes"]}
    assert not any(reason.startswith(KEPT_FOR_SPEED) for reason in reasons.values()), reasons
    assert result.report["kernels"]["integer_ops"].get("QLinearConv") == 2


def test_the_cost_table_speaks_only_for_the_runtime_it_was_measured_on():
    """On ONNX Runtime 1.19 (the declared floor) the table kept all of digits_cnn float while its fused int8
    model ran 1.5x faster than float: older releases plan `fast` as `fused`, with a note."""
    from qtool.quantization.kernel_costs import table_applies

    assert table_applies("1.32.0") and table_applies("1.33.1") and table_applies("2.0.0")
    assert not table_applies("1.19.0") and not table_applies("1.31.9") and not table_applies("nightly")


def matmul_softmax_matmul():
    """x [N, 256, 128] -> MatMul (weight [128, 256], 8.4 M MACs) -> Softmax over 256 -> MatMul (weight
    [256, 128]) -> y: an attention-sized Softmax between two MatMuls whose integer kernels pay."""
    weights = {"w1": (RNG.normal(size=(128, 256)) / 11).astype(np.float32),
               "w2": (RNG.normal(size=(256, 128)) / 16).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="mix")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256, 128])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256, 128])], weights)


def test_fast_keeps_softmax_float_between_integer_matmuls(tmp_path):
    """QLinearSoftmax runs 3-20x slower than float Softmax (albert_ja_pos: 935 vs 136 µs per [1, 4, 256, 256]):
    under `placement: fast` the Softmax reads the first MatMul's float output (MatMulIntegerToFloat) and its
    output is quantized for the MatMul after it; both MatMuls keep their integer kernels. `placement: fused`
    keeps QLinearSoftmax."""
    from qtool import api
    from qtool.recipe.load import load_recipe

    path = tmp_path / "model.onnx"
    path.write_bytes(matmul_softmax_matmul().SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(8, 1, 256, 128)))
    results = {}
    for placement in ("fast", "fused"):
        (tmp_path / f"{placement}.yaml").write_text(f"version: 1\nquantization: {{placement: {placement}}}\n")
        results[placement] = api.quantize(path, data, load_recipe(tmp_path / f"{placement}.yaml"))
    fast = results["fast"]
    assert wiring(fast.model.graph, "softmax") == ("MatMul", "QuantizeLinear")
    reasons = {node["node"]: node["reason"] for node in fast.report["plan"]["nodes"]}
    assert reasons["softmax"].startswith(KEPT_FOR_SPEED)
    assert fast.report["kernels"]["integer_ops"] == {"MatMulIntegerToFloat": 2}
    assert results["fused"].report["kernels"]["integer_ops"] == {
        "QLinearMatMul": 1, "QLinearSoftmax": 1, "MatMulIntegerToFloat": 1}


def test_softmax_costs_more_as_an_integer_kernel_at_every_measured_size():
    node = helper.make_node("Softmax", ["s"], ["p"], axis=-1)
    for shape in ((1, 8, 32, 32), (1, 4, 64, 64), (1, 4, 256, 256), (1, 2, 512, 512)):
        float_us, int8_us = node_costs(node, {"s": shape, "p": shape}, {})
        assert int8_us > 2 * float_us, shape


def real_model_shapes(name: str):
    """(prepared float model of shared model `name`, its tensor shapes on the first eval sample, preprocessed
    as its preset says)."""
    from qtool.api import prepare
    from qtool.io.data import DataFolder, model_inputs
    from qtool.recipe.load import load_recipe
    from qtool.runtime.session import tensor_shapes
    from conftest import ROOT, shared_model

    folder = shared_model(name)
    recipe = load_recipe(ROOT / "qtool" / "recipe" / "presets" / f"{name}.yaml")
    model, _ = prepare(folder / "model.onnx", recipe)
    feeds = next(DataFolder(folder / "eval", model_inputs(model), 1, images=recipe.data.images).batches(1)).feeds
    return model, tensor_shapes(model, feeds)


def depthwise_convs(model, kernel: int) -> set[str]:
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return {node.name for node in model.graph.node if node.op_type == "Conv" and weights[node.input[1]][1] == 1
            and weights[node.input[1]][0] > 1 and weights[node.input[1]][2:] == (kernel, kernel)}


def test_depthwise_convs_go_float_on_a_text_line_not_on_a_square_map():
    """Profiled here: ppocr_det's 5x5 depthwise Convs (192-384 channels on 20x20 and 10x10) run as integer
    kernels at 0.9-1.1x their float time, ppocr_cls's (3 rows of 96, 32-200 channels) at 2-3.5x: ORT's float
    kernel skips the taps in the padding (most of a 5x5 window on 3 rows) and runs long rows fast, its
    integer kernel computes every tap. With every node of both real models planned 8-bit, `fast` keeps
    ppocr_cls's float and ppocr_det's integer (one rate per op kept 4 of ppocr_det's 8 float)."""
    from qtool.quantization.rules import RULES

    for name, expect_float in (("ppocr_det", False), ("ppocr_cls", True)):
        model, shapes = real_model_shapes(name)
        planned = [node.name for node in model.graph.node if node.op_type in RULES]
        kept = {node for group in slower_regions(model.graph, planned, shapes) for node in group.nodes}
        depthwise = depthwise_convs(model, 5)
        assert len(depthwise) == 8
        assert (depthwise <= kept if expect_float else not depthwise & kept), (name, sorted(depthwise & kept))
