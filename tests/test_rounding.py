"""weights.rounding: input second moments streamed in calibration, GPTQ codes, and the plan that carries them."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper

from conftest import make_model, save_npy_folder
from qtool import api
from qtool.calibration.hessians import HessianObserver, im2col_of
from qtool.numerics import QTYPES, gptq_round, quant_bounds
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session, run

RNG = np.random.default_rng(11)


@pytest.mark.parametrize("attrs, x_shape, w_shape", [
    ({"pads": [1, 2, 0, 1], "strides": [2, 1], "dilations": [1, 2], "group": 2}, (2, 4, 9, 11), (6, 2, 3, 2)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2], "group": 4}, (1, 4, 7, 8), (8, 1, 3, 3)),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (1, 3, 7, 8), (5, 3, 2, 2)),
    ({"pads": [2, 1], "dilations": [3]}, (3, 2, 12), (4, 2, 3)),  # 1-D
])
def test_conv_second_moment_matches_onnxruntime(attrs, x_shape, w_shape):
    """tr(W_g H_g W_gᵀ) per output channel is the mean square of ORT's Conv output: H sees the
    same patches as the kernel (pads, strides, dilations, groups, auto_pad)."""
    w = RNG.normal(size=w_shape).astype(np.float32)
    x = RNG.normal(size=x_shape).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", *("S" * (len(x_shape) - 2))])],
                       {"w": w})
    y = run(make_session(model), {"x": x})["y"]
    observer = HessianObserver(im2col_of(node, w.shape))
    observer.update(x[:1])
    observer.update(x[1:])
    h = observer.result()
    groups = h.shape[0]
    rows = w.reshape(groups, w_shape[0] // groups, -1).astype(np.float64)
    predicted = np.einsum("grd,gde,gre->gr", rows, h, rows).reshape(-1)
    measured = np.mean(np.moveaxis(y, 1, 0).reshape(w_shape[0], -1).astype(np.float64) ** 2, axis=1)
    np.testing.assert_allclose(predicted, measured, rtol=1e-4)


def test_gptq_round_lowers_held_out_output_error():
    """On correlated inputs GPTQ codes move W x less than round-to-nearest does, on data it never saw."""
    rng = np.random.default_rng(0)
    d, rows = 48, 16

    def inputs(n):  # neighbours share 5 of 6 noise terms, as pixels of a smooth image do
        noise = rng.normal(size=(n, d + 5))
        return sum(noise[:, i:i + d] for i in range(6))
    fit, held = inputs(2000), inputs(2000)
    w = rng.normal(size=(rows, d))
    scale = np.abs(w).max(axis=1, keepdims=True) / 127 * np.ones((1, d))
    zero = np.zeros((rows, d))
    qmin, qmax = quant_bounds(QTYPES["int8"], symmetric=True)
    codes = gptq_round(w, scale, zero, qmin, qmax, fit.T @ fit / len(fit))
    nearest = np.clip(np.rint(w / scale), qmin, qmax)
    assert codes.min() >= qmin and codes.max() <= qmax and np.all(codes == np.rint(codes))

    def error(q):
        return np.mean(((q * scale - w) @ held.T) ** 2)
    assert 10 * np.log10(error(nearest) / error(codes)) > 5.0  # measured 7.0 dB
    # Inputs never seen (zero rows and columns of H) are rounded to nearest and take no error.
    h = fit.T @ fit / len(fit)
    h[:, 5] = h[5, :] = 0
    dead = gptq_round(w, scale, zero, qmin, qmax, h)
    np.testing.assert_array_equal(dead[:, 5], nearest[:, 5])


def _conv_gemm(tmp_path):
    """Conv → Relu → GlobalAveragePool → Flatten → Gemm on smooth (box-blurred) images, with
    calib and eval folders."""
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        {"w": RNG.normal(size=(16, 3, 3, 3)).astype(np.float32), "b": RNG.normal(size=16).astype(np.float32),
         "fw": RNG.normal(size=(5, 16)).astype(np.float32), "fb": RNG.normal(size=5).astype(np.float32)})
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())

    def images(n):
        noise = RNG.normal(size=(n, 3, 10, 10))
        return sum(noise[..., i:i + 8, j:j + 8] for i in range(3) for j in range(3)).astype(np.float32)
    return path, save_npy_folder(tmp_path / "calib", images(64)), save_npy_folder(tmp_path / "eval", images(64))


def _recipe(rounding: str, extra: str = "") -> Recipe:
    return Recipe.model_validate(yaml.safe_load(f"""
quantization:
  activations: {{dtype: uint16}}
  weights: {{dtype: int8, rounding: {rounding}}}
{extra}"""))


def test_gptq_rounding_end_to_end(tmp_path):
    path, calib, evaluation = _conv_gemm(tmp_path)
    results = {rounding: api.quantize(path, calib, _recipe(rounding), validation_data=evaluation)
               for rounding in ("nearest", "gptq")}
    sqnr = {r: res.report["validation"]["outputs"]["y"]["sqnr_db"] for r, res in results.items()}
    assert sqnr["gptq"] > sqnr["nearest"] + 5.0, sqnr  # measured 43.1 -> 53.6 dB
    tensors = {n["node"]: n["tensors"] for n in results["gptq"].report["plan"]["nodes"]}
    assert "gptq rounding" in tensors["conv"]["w"] and "gptq rounding" in tensors["fc"]["fw"]
    assert "gptq" not in str(results["nearest"].report["plan"]["nodes"])


def test_gptq_per_node_override_and_table_fallback(tmp_path):
    """An override keeps one node nearest; a calibration table (no input statistics) falls back to
    nearest with a note; int8 activations still run on ORT's integer kernels."""
    path, calib, evaluation = _conv_gemm(tmp_path)
    recipe = _recipe("gptq", "  overrides:\n    - {match: {op_type: Gemm}, weights: {rounding: nearest}}")
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(  # a tiny model: see conftest.FUSED
        update={"placement": "fused", "activations": recipe.quantization.activations.model_copy(update={"dtype": "uint8"})})})
    result = api.quantize(path, calib, recipe, validation_data=evaluation)
    tensors = {n["node"]: n["tensors"] for n in result.report["plan"]["nodes"]}
    assert "gptq rounding" in tensors["conv"]["w"] and "gptq" not in tensors["fc"]["fw"]
    assert {"QLinearConv", "QGemm"} <= set(result.report["kernels"]["integer_ops"])
    api.calibrate(path, calib, recipe, tmp_path / "table.json")
    from_table = api.quantize(path, None, recipe, calibration=tmp_path / "table.json", validation_data=evaluation)
    assert "gptq" not in str(from_table.report["plan"]["nodes"])
    assert any("no input statistics" in note for note in from_table.report["plan"]["notes"])
