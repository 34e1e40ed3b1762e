"""quantization.mode dynamic: int8 weights, activations quantized at run time by ONNX Runtime's kernels.

Tiny models built here (MatMul + Gemm, a bidirectional LSTM, an embedding Gather) run on real ONNX
Runtime; dynamic and static mixed per node through overrides; no calibration data needed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_gemm, make_model, save_npy_folder, shared_model
from qtool import api
from qtool.cli.main import main
from qtool.errors import ModelError, UsageError
from qtool.quantization.dynamic import GATHER_MIN_ELEMENTS
from qtool.recipe.schema import Recipe
from qtool.runtime.session import int8_kernels_may_saturate, make_session, run

RNG = np.random.default_rng(21)
UNTIMED = {"version": 1, "quantization": {"mode": "dynamic"}, "validation": {"gates": {"min_cosine": 0.99}}}


def recipe_of(**quantization) -> Recipe:
    return Recipe.model_validate({**UNTIMED, "quantization": {"mode": "dynamic", **quantization}})


def dense_model() -> onnx.ModelProto:
    """x [N, 16] → MatMul [16, 32] → Add → Relu → Gemm (transB, alpha 0.5, beta 2, C [8]) → y [N, 8]."""
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="/fc1/MatMul"),
         helper.make_node("Add", ["mm", "b"], ["a"], name="/fc1/Add"),
         helper.make_node("Relu", ["a"], ["r"], name="/relu"),
         helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="/fc2/Gemm", transB=1, alpha=0.5, beta=2.0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        {"w": RNG.normal(size=(16, 32)).astype(np.float32) * np.linspace(0.1, 3, 32, dtype=np.float32),
         "b": RNG.normal(size=32).astype(np.float32), "w2": RNG.normal(size=(8, 32)).astype(np.float32),
         "c2": RNG.normal(size=8).astype(np.float32)},
    )


def save(tmp_path, model, name="model.onnx"):
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def initializer(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_matmul_and_gemm_become_dynamic_quantize_matmul_without_calibration_data(tmp_path):
    model = dense_model()
    path = save(tmp_path, model)
    data = save_npy_folder(tmp_path / "eval", RNG.normal(size=(8, 1, 16)))
    result = api.quantize(path, None, recipe_of(), validation_data=data)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2 and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    fc1, fc2 = (n for n in result.model.graph.node if n.op_type == "DynamicQuantizeMatMul")
    assert fc1.domain == "com.microsoft" and (fc1.name, fc2.name) == ("/fc1/MatMul", "/fc2/Gemm")
    # per output column: codes x scale give back the weight (within half a step), int8 symmetric; 7-bit
    # (reduce_range auto) on x86 CPUs without VNNI, where ORT's kernels add int8 pairs in int16
    w = initializer(model, "w")
    codes, scale = initializer(result.model, fc1.input[1]), initializer(result.model, fc1.input[2])
    top = 63 if int8_kernels_may_saturate() else 127
    assert codes.dtype == np.int8 and scale.shape == (32,) and np.abs(codes).max() == top
    assert np.all(np.abs(codes * scale - w) <= scale / 2 + 1e-7)
    # the bias Add that alone reads the MatMul is folded into the kernel's bias input
    assert "Add" not in ops and list(fc1.output) == ["a"]
    np.testing.assert_array_equal(initializer(result.model, fc1.input[4]), initializer(model, "b"))
    # Gemm: weight transposed to [K, N], alpha folded into the scales, beta * C into the bias
    w2 = 0.5 * initializer(model, "w2").T
    codes2, scale2 = initializer(result.model, fc2.input[1]), initializer(result.model, fc2.input[2])
    assert codes2.shape == (32, 8) and np.all(np.abs(codes2 * scale2 - w2) <= scale2 / 2 + 1e-7)
    np.testing.assert_allclose(initializer(result.model, fc2.input[4]), 2.0 * initializer(model, "c2"), rtol=1e-6)
    x = RNG.normal(size=(4, 16)).astype(np.float32)
    want, got = run(make_session(model), {"x": x})["y"], run(make_session(result.model), {"x": x})["y"]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert result.report["validation"]["outputs"]["y"]["cosine"] >= 0.999
    assert result.report["kernels"]["integer_ops"] == {"DynamicQuantizeMatMul": 2}
    assert "calibration" not in " ".join(result.report["warnings"])
    # the report said `method: minmax, samples: 0` of a calibration that never ran
    assert result.report["calibration"]["method"] == "none" and "run time" in result.report["calibration"]["why"]
    reasons = {n["node"]: n["reason"] for n in result.report["plan"]["nodes"]}
    assert reasons["/fc1/MatMul"] == "mode dynamic"
    assert reasons["/fc1/Add"] == "bias folded into /fc1/MatMul (DynamicQuantizeMatMul)"


def lstm_model(hidden: int = 16, features: int = 12) -> onnx.ModelProto:
    """x [T, N, 12] → bidirectional LSTM (bias, initial state) → Y [T, 2, N, 16]."""
    return make_model(
        [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["Y", "Yh"], name="/rnn/LSTM",
                          hidden_size=hidden, direction="bidirectional")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 2, features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 2, 2, hidden])],
        {"W": (RNG.normal(size=(2, 4 * hidden, features)) / 3).astype(np.float32),
         "R": (RNG.normal(size=(2, 4 * hidden, hidden)) / 4).astype(np.float32),
         "B": (RNG.normal(size=(2, 8 * hidden)) / 10).astype(np.float32),
         "h0": np.zeros((2, 2, hidden), np.float32), "c0": np.zeros((2, 2, hidden), np.float32)},
    )


def test_lstm_becomes_dynamic_quantize_lstm(tmp_path):
    model = lstm_model()
    data = save_npy_folder(tmp_path / "eval", RNG.normal(size=(6, 20, 2, 12)))
    result = api.quantize(save(tmp_path, model), None, recipe_of(), validation_data=data)
    (node,) = [n for n in result.model.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert node.domain == "com.microsoft" and len(node.input) == 12
    # ONNX Runtime's layout: [dirs, in, 4H], one scale (and zero zero point) per direction and gate row
    w, codes, scale = initializer(model, "W"), initializer(result.model, node.input[1]), \
        initializer(result.model, node.input[8])
    assert codes.shape == (2, 12, 64) and scale.shape == (2, 64)
    assert np.all(np.abs(codes.transpose(0, 2, 1) * scale[..., None] - w) <= scale[..., None] / 2 + 1e-7)
    assert not initializer(result.model, node.input[9]).any()
    assert result.report["validation"]["outputs"]["Y"]["cosine"] >= 0.999
    assert result.report["kernels"]["integer_ops"] == {"DynamicQuantizeLSTM": 1}


def embedding_model(rows: int) -> onnx.ModelProto:
    """ids [N, 6] int64 → Gather(table [rows, 128]) → y [N, 6, 128]."""
    table = RNG.normal(size=(rows, 128)).astype(np.float32) * RNG.uniform(0.1, 4, size=(rows, 1)).astype(np.float32)
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="/embed/Gather")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 128])], {"table": table},
    )


def test_large_embedding_tables_are_stored_int8_per_row_small_ones_stay_float(tmp_path):
    rows = GATHER_MIN_ELEMENTS // 128
    model = embedding_model(rows)
    ids = RNG.integers(0, rows, size=(3, 6)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    result = api.quantize(save(tmp_path, model), None, recipe_of(), validation_data=tmp_path / "ids.npy")
    codes = next(t for t in result.model.graph.initializer if t.data_type == TensorProto.INT8)
    assert list(codes.dims) == [rows, 128]
    assert sum(len(t.raw_data) for t in result.model.graph.initializer) < rows * 128 * 4 / 3.5
    table = initializer(model, "table")
    want, got = table[ids], run(make_session(result.model), {"ids": ids})["y"]
    step = (np.abs(table).max(axis=1) / 127)[ids][..., None]
    assert np.all(np.abs(got - want) <= step / 2 + 1e-6)  # each row on its own scale

    small = embedding_model(rows // 2)
    with pytest.raises(ModelError, match="nothing to quantize.*Gather×1: dynamic: table of 32768 values"):
        api.quantize(save(tmp_path, small, "small.onnx"), None, recipe_of(), validation_data=tmp_path / "ids.npy")



def test_overrides_mix_a_static_front_end_with_a_dynamic_back_end(tmp_path):
    path = save(tmp_path, conv_gemm(RNG))
    data = save_npy_folder(tmp_path / "calib", RNG.normal(size=(8, 1, 3, 8, 8)))
    recipe = recipe_of(placement="fused", overrides=[{"match": {"op_type": "Conv"}, "mode": "static"}])
    with pytest.raises(UsageError, match=r"tensor\(s\) the recipe quantizes statically \(e.g. (x|c)\) need "
                                         r"calibration data"):
        api.quantize(path, None, recipe, validation_data=data)
    result = api.quantize(path, data, recipe)
    ops = result.report["kernels"]["optimized_ops"]
    assert ops.get("QLinearConv") == 1 and ops.get("DynamicQuantizeMatMul") == 1 and "Gemm" not in ops
    reasons = {n["node"]: n["reason"] for n in result.report["plan"]["nodes"]}
    assert reasons["/head/fc"] == "mode dynamic"
    assert reasons["/enc/conv"].startswith("rule Conv") and "overrides[0]" not in reasons["/head/fc"]
    assert result.report["validation"]["outputs"]["y"]["cosine"] >= 0.99
    # and the other way round: static by default, one node dynamic
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "overrides": [{"match": {"name": "/head/fc"}, "mode": "dynamic"}]}})
    ops = api.quantize(path, data, recipe).report["kernels"]["optimized_ops"]
    assert ops.get("QLinearConv") == 1 and ops.get("DynamicQuantizeMatMul") == 1


def test_cli_dynamic_needs_no_data_but_validation_data(tmp_path):
    path = save(tmp_path, dense_model())
    data = save_npy_folder(tmp_path / "eval", RNG.normal(size=(4, 1, 16)))
    recipe = tmp_path / "dynamic.yaml"
    recipe.write_text(yaml.safe_dump(UNTIMED))
    ok = CliRunner().invoke(main, ["quantize", str(path), "--recipe", str(recipe), "--validation-data", str(data),
                                   "--output", str(tmp_path / "out"), "--no-bench", "--quiet"])
    assert ok.exit_code == 0, ok.output
    missing = CliRunner().invoke(main, ["quantize", str(path), "--recipe", str(recipe),
                                        "--output", str(tmp_path / "out2"), "--quiet"])
    assert missing.exit_code == 2
    assert "give validation data with --validation-data or the recipe's validation.data" in missing.output


def test_albert_dynamic_int8_all_weighted_matmuls(tmp_path):
    """The real ALBERT: weights reached through Identity are quantized too (27 DynamicQuantizeMatMul), the
    word-embedding table int8; its logits keep ~31.6 dB (16 samples; measured in bench/sequence.py)."""
    folder = shared_model("albert_ja_pos")
    recipe = Recipe.model_validate({**UNTIMED, "validation": {"samples": 4, "gates": {}}})
    result = api.quantize(folder / "model.onnx", None, recipe, validation_data=folder / "eval")
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 27 and ops.count("MatMul") == 8  # attention: two activations
    assert sum(t.data_type == TensorProto.INT8 and t.dims[0] == 2383 for t in result.model.graph.initializer) == 1
    output = result.report["validation"]["outputs"]["403"]  # int64 tags from an ArgMax: scored by exact match
    assert output["exact_match"] >= 0.99 and "top1_agreement" not in output


def test_pyannote_lstms_run_as_dynamic_quantize_lstm():
    """The real speaker-segmentation model: 4 bidirectional LSTMs and 3 MatMuls dynamic, its SincNet Conv
    (inside an If) float; 35.1 dB on 16 samples in bench/sequence.py, quantize_dynamic 25.9 dB."""
    folder = shared_model("pyannote_seg3")
    recipe = Recipe.model_validate({**UNTIMED, "validation": {"samples": 2, "gates": {}}})
    result = api.quantize(folder / "model.onnx", None, recipe, validation_data=folder / "eval")
    assert result.report["kernels"]["integer_ops"] == {"DynamicQuantizeLSTM": 4, "DynamicQuantizeMatMul": 3}
    assert result.report["validation"]["outputs"]["output"]["sqnr_db"] >= 30
