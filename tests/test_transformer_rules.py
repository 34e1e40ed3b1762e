"""Static int8 on attention: additive masks (-10000, float32 min) must not wreck the Softmax input's scale.

A tiny single-head attention block built here, calibrated and validated on real ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import make_model
from qtool import api
from qtool.recipe.schema import Recipe

S, D = 16, 32


def attention(fill: float, seed: int = 0):
    """x [N, S, D], m [N, 1, S] (1 = attend) → softmax(x Wq (x Wk)ᵀ + (1 - m) · fill) x."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
             helper.make_node("Sub", ["one", "m"], ["inv"], name="inv"),
             helper.make_node("Mul", ["inv", "fill"], ["bias"], name="mask"),
             helper.make_node("Add", ["s", "bias"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "x"], ["y"], name="context")]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", S, D]),
                helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 1, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", S, D])],
        {"wq": rng.normal(size=(D, D)).astype(np.float32) / 4, "wk": rng.normal(size=(D, D)).astype(np.float32) / 4,
         "one": np.array(1, np.float32), "fill": np.array(fill, np.float32)})


@pytest.mark.parametrize("fill", [-10000.0, -3.4e38])
def test_additive_mask_range_is_clamped_for_softmax(tmp_path, fill):
    rng = np.random.default_rng(1)
    (tmp_path / "data").mkdir()
    for i in range(8):  # the last i + 1 tokens are padding
        mask = np.ones((1, 1, S), np.float32)
        mask[..., S - 1 - i:] = 0
        np.savez(tmp_path / "data" / f"{i}.npz", x=rng.normal(size=(1, S, D)).astype(np.float32), m=mask)
    path = tmp_path / "model.onnx"
    path.write_bytes(attention(fill).SerializeToString())
    result = api.quantize(path, tmp_path / "data", Recipe.model_validate({"validation": {"gates": {}}}))
    # without the clamp, -10000 gave one scale of ~40 for scores within +-45: 1.8 dB
    assert result.report["validation"]["outputs"]["y"]["sqnr_db"] >= 20
    assert result.report["kernels"]["integer_ops"].get("QLinearSoftmax") == 1
    assert any(note.startswith("masked: read only by Softmax, range [") and "clamped at -64" in note
               for note in result.report["plan"]["notes"])
