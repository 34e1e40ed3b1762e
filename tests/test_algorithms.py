"""quantization.algorithms: cross-layer equalization keeps the float function and equalizes ranges;
bias correction removes the mean output shift it measures; both are reported, off-able, deterministic."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, save_npy_folder, shared_model, fused_recipe
from qtool import api
from qtool.errors import RecipeError
from qtool.quantization.algorithms.equalization import equalize, find_pairs
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session, run

RNG = np.random.default_rng(18)


def _uneven(shape, axis):
    """Seeded weights whose channels along `axis` span three orders of magnitude."""
    spread = np.logspace(-1.5, 1.5, shape[axis])
    return (RNG.normal(size=shape) * spread.reshape([-1 if i == axis else 1 for i in range(len(shape))])) \
        .astype(np.float32)


def cle_model():
    """x → Conv → Relu → depthwise Conv → Relu → pointwise → Conv (no activation) → Clip → Conv → y.

    Three pairs CLE may rescale (Relu, Relu, nothing between); the Clip (ReLU6) pair it must not:
    Clip(x / s, 0, 6) is not Clip(x, 0, 6) / s."""
    weights = {
        "w0": _uneven((8, 3, 3, 3), 0), "b0": RNG.normal(size=8).astype(np.float32),
        "w1": _uneven((8, 1, 3, 3), 0), "b1": RNG.normal(size=8).astype(np.float32),
        "w2": RNG.normal(size=(6, 8, 1, 1)).astype(np.float32), "b2": RNG.normal(size=6).astype(np.float32),
        "w3": _uneven((5, 6, 1, 1), 1),
        "w4": _uneven((4, 5, 3, 3), 1), "b4": RNG.normal(size=4).astype(np.float32),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="pointwise"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], name="linear"),
        helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"], name="relu6"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="head"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], weights)


def _outputs(model, feeds):
    return run(make_session(model, optimize=False), feeds)


def test_cle_keeps_the_float_function_and_equalizes_each_pair():
    model = cle_model()
    x = {"x": RNG.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    before = _outputs(model, x)["y"]
    pairs = [(a.name, b.name, through) for a, b, through in find_pairs(model)]
    assert pairs == [("conv0", "depthwise", "Relu"), ("depthwise", "pointwise", "Relu"), ("pointwise", "linear", "")]
    model, changed = equalize(model)
    after = _outputs(model, x)["y"]
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    # The last pair in a chain is exactly balanced: its first Conv's output ranges equal its second's input ranges.
    out_ranges = np.abs(weights["w2"]).reshape(6, -1).max(axis=1)
    in_ranges = np.abs(weights["w3"]).transpose(1, 0, 2, 3).reshape(6, -1).max(axis=1)
    np.testing.assert_allclose(out_ranges, in_ranges, rtol=1e-3)
    assert [p.first for p in changed] == ["conv0", "depthwise", "pointwise"]
    depthwise = next(p for p in changed if p.first == "depthwise")
    assert depthwise.spread_before > 10 and depthwise.spread_after < depthwise.spread_before / 3
    # The ReLU6 pair's weights are untouched: w4 is bit for bit what it was.
    np.testing.assert_array_equal(weights["w4"], numpy_helper.to_array(
        next(i for i in cle_model_initializers() if i.name == "w4")))


def cle_model_initializers():
    global RNG
    saved, RNG = RNG, np.random.default_rng(18)
    try:
        return list(cle_model().graph.initializer)
    finally:
        RNG = saved


def test_cle_keeps_centerfaces_function():
    """centerface: MobileNetV2-style, depthwise kernels with max/std ≈ 30, 36 Relu-linked pairs."""
    folder = shared_model("centerface")
    model, _ = api.prepare(folder / "model.onnx")
    x = np.load(sorted((folder / "eval").glob("*.npy"))[0])
    feeds = {model.graph.input[0].name: x[None] if x.ndim == 3 else x}
    before = _outputs(model, feeds)
    model, pairs = equalize(model)
    after = _outputs(model, feeds)
    assert len(pairs) >= 30
    assert max(p.spread_before for p in pairs) > 5 and max(p.spread_after for p in pairs) < 5
    for name, value in before.items():
        assert np.max(np.abs(after[name] - value)) <= 1e-5 * np.max(np.abs(value)), name


def gemm_model(k: int = 64, n: int = 16):
    """x [N, k] → Gemm (transB, bias) → y: its output is a float graph output, read straight from QGemm."""
    rng = np.random.default_rng(5)
    weights = {"w": rng.normal(size=(n, k)).astype(np.float32) / 8, "b": rng.normal(size=n).astype(np.float32)}
    return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], weights)


def _quantize_gemm(tmp_path, bias_correction: bool):
    model = gemm_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    # Integers 0..255 with both ends present: the uint8 range is [0, 255] with scale 1, so the quantized
    # input equals the float one and the output error is the weights' rounding alone: mean x·ε per channel.
    x = np.random.default_rng(3).integers(0, 256, size=(64, 64)).astype(np.float32)
    x[0, 0], x[1, 0] = 0, 255
    data = save_npy_folder(tmp_path / f"data{bias_correction}", [x])
    # 7-bit weights on every CPU (`reduce_range: auto` gives 8-bit on VNNI CPUs only): the same rounding everywhere
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "weights": {"reduce_range": True},
                                                     "algorithms": {"bias_correction": bias_correction}}})
    result = api.quantize(path, data, recipe)
    shift = np.mean(_outputs(result.model, {"x": x})["y"] - _outputs(model, {"x": x})["y"], axis=0)
    return result, shift


def test_bias_correction_removes_the_mean_shift_it_measures(tmp_path):
    plain, shift = _quantize_gemm(tmp_path, False)
    corrected, left = _quantize_gemm(tmp_path, True)
    section = corrected.report["algorithms"]["bias_correction"]
    layers = section["layers"]
    assert [(layer["node"], layer["channels"], layer["bias_added"]) for layer in layers] == [("gemm", 16, False)]
    assert section["kept"] and section["setting"] is True and section["min_t"] == 2.0
    # What it measured is the shift the uncorrected model has, but for the int32 bias's own rounding
    # (at most half its scale: input scale 1 x weight scale) ...
    scales = {init.name: numpy_helper.to_array(init) for init in plain.model.graph.initializer}["w_scale"]
    rounding = float(scales.max()) / 2
    assert abs(layers[0]["max_abs_shift"] - np.abs(shift).max()) <= rounding
    # ... and what is left on the channels it corrected is that rounding; the few it left alone had
    # shifts within 2 standard errors of 0 over the 64 samples.
    kept = layers[0]["corrected_channels"]
    assert 12 <= kept <= 16 and layers[0]["dropped_max_abs_shift"] < np.abs(shift).max() / 10
    assert np.abs(shift).max() > 0.05
    assert np.sort(np.abs(left))[kept - 1] <= 2 * rounding < np.abs(shift).max() / 20
    assert np.abs(left).max() <= max(layers[0]["dropped_max_abs_shift"], 0.0) + 2 * rounding
    assert plain.report["algorithms"]["bias_correction"] == {"enabled": False, "min_t": 2.0, "setting": False,
                                                             "kept": False, "layers": []}


def _gemm_rounding_case(tmp_path, name: str, weight: np.ndarray, x: np.ndarray, setting, reduce_range: bool):
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1]])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight.shape[0]])],
                       {"w": weight, "b": np.zeros(weight.shape[0], np.float32)})
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / f"{name}-data", [x])
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "weights": {"reduce_range": reduce_range},
                                                     "algorithms": {"bias_correction": setting}}})
    return api.quantize(path, data, recipe).report["algorithms"]["bias_correction"]


def test_bias_correction_auto_keeps_it_where_it_helps_and_drops_it_where_it_hurts(tmp_path):
    rng = np.random.default_rng(7)
    # Helps: integer inputs 0..255 quantize exactly (scale 1), so the output error is the weights'
    # rounding alone, and taking out its mean raises the output SQNR.
    x = rng.integers(0, 256, size=(32, 64)).astype(np.float32)
    x[0, 0], x[1, 0] = 0, 255
    # 7-bit weights, as on CPUs without VNNI (full-range ones could overflow ORT's int16 pair sums there)
    helps = _gemm_rounding_case(tmp_path, "helps", rng.normal(size=(16, 64)).astype(np.float32) / 8, x, "auto",
                                reduce_range=True)
    assert helps["kept"] and helps["enabled"] and helps["setting"] == "auto"
    assert helps["worst_output_sqnr_db"]["with"] > helps["worst_output_sqnr_db"]["without"] + 3
    # Hurts: column 0 (0 or 255) sets the input scale to 1, so every other input, 0.4, rounds to 0;
    # weights 127 then 0.6 round to 127 then 1 (ε = +0.4). The float input's shift 0.4·Σε is what
    # the correction takes out, yet the quantized model never sees it (its input is 0): the output's
    # mean error grows from 0.4·Σw to 0.4·Σw̃. 8-bit weights on every CPU (7-bit ones would round 0.6 to 0);
    # each int16 pair sum, 255·127 + 0·1, fits where ORT's kernels add pairs in int16.
    x = np.full((32, 16), 0.4, np.float32)
    x[:, 0] = np.tile([0.0, 255.0], 16)
    weight = np.full((4, 16), 0.6, np.float32)
    weight[:, 0] = 127
    hurts = _gemm_rounding_case(tmp_path, "hurts", weight, x, "auto", reduce_range=False)
    assert hurts["layers"][0]["corrected_channels"] == 4 and not hurts["kept"] and not hurts["enabled"]
    assert hurts["worst_output_sqnr_db"]["with"] < hurts["worst_output_sqnr_db"]["without"]
    assert hurts["why"].startswith("auto: dropped")
    forced = _gemm_rounding_case(tmp_path, "forced", weight, x, True, reduce_range=False)
    assert forced["kept"] and forced["worst_output_sqnr_db"] == {"without": None, "with": None}


def test_bias_correction_adds_a_bias_where_a_conv_has_none(tmp_path):
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                       {"w": RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)})
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    # A mean of 3 on every input channel: the shift 3·Σε per channel stands far out of its noise.
    data = save_npy_folder(tmp_path / "data", 3 + RNG.normal(size=(8, 1, 3, 8, 8)))
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "algorithms": {"bias_correction": True}}})
    result = api.quantize(path, data, recipe)
    [layer] = result.report["algorithms"]["bias_correction"]["layers"]
    assert layer["node"] == "conv" and layer["bias_added"] and layer["channels"] == 4
    conv = next(node for node in result.model.graph.node if node.name == "conv")
    assert len(conv.input) == 3 and conv.input[2]  # the correction rides on a new, int32-quantized bias


def test_algorithms_are_reported_deterministic_and_need_data(tmp_path):
    model = cle_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", RNG.normal(size=(8, 1, 3, 8, 8)))
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "algorithms": {"bias_correction": True, "equalization": True}}})
    first = api.quantize(path, data, recipe, tmp_path / "a")
    second = api.quantize(path, data, recipe, tmp_path / "b")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    section = json.loads((tmp_path / "a" / "report.json").read_text())["algorithms"]
    assert [p["first"] for p in section["equalization"]["pairs"]] == ["conv0", "depthwise", "pointwise"]
    assert {layer["node"] for layer in section["bias_correction"]["layers"]} == \
        {"conv0", "depthwise", "pointwise", "linear", "head"}
    assert first.report["prepare"][-1] == "equalization: 3 Conv pairs rescaled"
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| equalization | 3 Conv pairs rescaled; widest channel-range spread" in markdown
    assert re.search(r"\| bias_correction \| \d biases corrected \(\d+ of 31 channels; the rest within 2 standard "
                     r"errors of 0\); largest shift ", markdown)
    assert "| smoothing |" not in markdown  # off: no row
    table = api.calibrate(path, data, recipe, tmp_path / "table.json")
    from_table = api.quantize(path, None, recipe, calibration=table.output, validation_data=data)
    assert from_table.report["algorithms"]["bias_correction"]["skipped"].startswith(
        "quantization.algorithms.bias_correction needs calibration data")
    assert any("bias_correction needs calibration data" in w for w in from_table.report["warnings"])  # asked for
    default = api.quantize(path, None, fused_recipe(), calibration=table.output, validation_data=data)
    assert "skipped" in default.report["algorithms"]["bias_correction"]  # on by default: a note, no warning
    assert not any("bias_correction" in w for w in default.report["warnings"])
    # The table was made on the equalized model: its tensors' ranges are the ones quantize needs.
    assert from_table.report["algorithms"]["equalization"]["pairs"] == section["equalization"]["pairs"]
    assert second.report["validation"] == first.report["validation"]


@pytest.mark.parametrize("key", ["equalization", "bias_correction"])
def test_recipe_switches_are_booleans(tmp_path, key):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"version: 1\nquantization:\n  placement: fused\n  algorithms:\n    {key}: maybe\n")
    with pytest.raises(RecipeError, match=f"algorithms.{key}"):
        load_recipe(path)


def smoothing_model(k: int = 16, n: int = 8, residual: bool = True):
    """x [N, 4, k] → LayerNorm → two MatMuls (q, v) → Add; the LayerNorm's scale puts outliers in two
    channels (×40), the SmoothQuant case. With `residual`, a second LayerNorm feeds a MatMul and a
    residual Add: scaling its output would change the Add, so it must be left alone."""
    rng = np.random.default_rng(7)
    gamma = np.ones(k, np.float32)
    gamma[[3, 11]] = 40.0
    weights = {"gamma": gamma, "beta": rng.normal(size=k).astype(np.float32),
               "wq": rng.normal(size=(k, n)).astype(np.float32), "wv": rng.normal(size=(k, n)).astype(np.float32)}
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="v"),
        helper.make_node("Add", ["q", "v"], ["h" if residual else "y"], name="sum"),
    ]
    if residual:
        weights.update(g2=rng.normal(size=n).astype(np.float32), w2=rng.normal(size=(n, n)).astype(np.float32))
        nodes += [helper.make_node("LayerNormalization", ["h", "g2"], ["ln2"], name="ln2", axis=-1),
                  helper.make_node("MatMul", ["ln2", "w2"], ["m2"], name="m2"),
                  helper.make_node("Add", ["m2", "ln2"], ["y"], name="residual")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, n])], weights, opset=17)


def test_smoothing_keeps_the_float_function_and_levels_the_outlier_channels(tmp_path):
    from qtool.io.data import DataFolder, model_inputs
    from qtool.quantization.algorithms.smoothing import find_groups, smooth

    model = smoothing_model()
    assert [([n.name for n in norms], [r.name for r in readers]) for norms, readers in find_groups(model)] == \
        [(["ln"], ["q", "v"])]
    x = np.random.default_rng(8).normal(size=(6, 1, 4, 16)).astype(np.float32)
    data = DataFolder(save_npy_folder(tmp_path / "data", x), model_inputs(model))
    feeds = {"x": x[:, 0]}
    before = _outputs(model, feeds)
    original = {i.name: numpy_helper.to_array(i) for i in smoothing_model().graph.initializer}
    model, [group] = smooth(model, data, batch_size=4)
    after = _outputs(model, feeds)
    assert np.max(np.abs(after["y"] - before["y"])) <= 1e-5 * np.max(np.abs(before["y"]))
    # s_j = sqrt(max|x_j| / max over both weights of |W_j,:|), x the LayerNorm's output on the data it saw.
    centred = x[:, 0] - x[:, 0].mean(axis=-1, keepdims=True)
    ln = centred / np.sqrt(np.mean(centred ** 2, axis=-1, keepdims=True) + 1e-5) * original["gamma"] + original["beta"]
    rows = np.maximum(np.abs(original["wq"]).max(axis=1), np.abs(original["wv"]).max(axis=1))
    expected = np.sqrt(np.abs(ln).reshape(-1, 16).max(axis=0) / rows)
    np.testing.assert_allclose([group.scale_min, group.scale_max], [expected.min(), expected.max()], rtol=1e-4)
    assert group.outlier_ratio_before > 20 and group.outlier_ratio_after < group.outlier_ratio_before / 4
    # The residual LayerNorm's scale is as it was.
    params = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(params["g2"], original["g2"])


def test_smoothing_through_quantize_is_reported_and_helps(tmp_path):
    model = smoothing_model(residual=False)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(9).normal(size=(16, 1, 4, 16)))
    figures = {}
    for on in (False, True):
        recipe = Recipe.model_validate({"quantization": {"placement": "fused", "algorithms": {"smoothing": on}}})
        result = api.quantize(path, data, recipe)
        figures[on] = result.report["validation"]["outputs"]["y"]["sqnr_db"]
        groups = result.report["algorithms"]["smoothing"]["groups"]
        assert [(g["norms"], g["readers"]) for g in groups] == ([(["ln"], ["q", "v"])] if on else [])
    assert figures[True] > figures[False] + 3


def test_measuring_passes_run_in_batches_the_model_accepts(tmp_path):
    """u2netp fixes its batch dimension at 1: the algorithms' passes cut the recipe's batches to it."""
    from qtool.io.data import DataFolder, model_inputs
    from qtool.quantization.algorithms.streaming import feeds

    fixed = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    x = RNG.normal(size=(5, 1, 4))
    data = DataFolder(save_npy_folder(tmp_path / "data", x), model_inputs(fixed))
    runs = list(feeds(fixed, data, batch_size=8))
    assert [count for count, _ in runs] == [1] * 5
    np.testing.assert_array_equal(np.concatenate([f["x"] for _, f in runs]), x[:, 0].astype(np.float32))
    for dim in ("N", -1):  # ppocr_cls declares its batch dimension as -1: not a fixed size
        free = make_model([helper.make_node("Relu", ["x"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 4])])
        data = DataFolder(save_npy_folder(tmp_path / f"free{dim}", x), model_inputs(free))
        assert [count for count, _ in feeds(free, data, batch_size=4)] == [4, 1]
