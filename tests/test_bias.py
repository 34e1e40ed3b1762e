"""The int32 bias of a quantized Conv/Gemm holds its float value in every weight mode."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, save_npy_folder
from qtool import api
from qtool.recipe.load import load_recipe

MODES = [(dtype, symmetric, granularity) for dtype in ("int8", "uint8", "int4")
         for symmetric in (True, False) for granularity in ("per_channel", "per_tensor", "per_block")]


def gemm_head(weight: np.ndarray, bias: np.ndarray):
    """x [N, 16] → Gemm (weight [16, 4]) → y, a graph output."""
    return make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"w": weight, "b": bias},
    )


def quantize_head(tmp_path, model, dtype, symmetric, granularity):
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(1).normal(size=(16, 1, 16)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nquantization:\n  placement: fused\n  weights: {{dtype: {dtype}, symmetric: {str(symmetric).lower()}, "
                      f"granularity: {granularity}}}\n")
    result = api.quantize(path, data, load_recipe(recipe))
    x = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": x})[0]
    return result, expected, got


@pytest.mark.parametrize("dtype,symmetric,granularity", MODES)
def test_dead_channels_keep_their_bias(tmp_path, dtype, symmetric, granularity):
    """An all-zero and a ~1e-26 weight channel with bias 5.0 output 5.0, within half a bias quantum."""
    weight = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    weight[:, 1] = 1e-26
    weight[:, 2] = 0.0
    bias = np.array([0.1, 5.0, 5.0, 0.3], np.float32)
    result, expected, got = quantize_head(tmp_path, gemm_head(weight, bias), dtype, symmetric, granularity)
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    # per_block keeps the bias float (no integer kernel): exact there
    quantum = np.broadcast_to(inits.get("b_scale", 0.0), (4,))
    for channel in (1, 2):
        assert np.allclose(expected[:, channel], 5.0, atol=1e-6)
        assert np.all(np.abs(got[:, channel] - 5.0) <= quantum[channel] / 2 + 1e-6), (channel, got[:, channel])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_tiny_weights_with_a_large_bias_do_not_collapse(tmp_path, symmetric, granularity):
    """Weights ~1e-8 make a scale ~1e-10; a bias of 3 over it overflows int32 unless the scale is raised."""
    weight = (np.random.default_rng(0).normal(size=(16, 4)) * 1e-8).astype(np.float32)
    bias = np.array([3.0, -4.0, 5.0, 2.0], np.float32)
    result, expected, got = quantize_head(tmp_path, gemm_head(weight, bias), "int8", symmetric, granularity)
    assert np.allclose(got, expected, atol=0.05)
    assert any("raised so the int32 bias fits" in note for note in result.report["plan"]["notes"])
