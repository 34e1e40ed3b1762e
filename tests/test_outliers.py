"""quantization.algorithms.outliers: outlier tensors found, equalized into their readers (float function kept)
or kept float, reported, deterministic."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from conftest import make_model, save_npy_folder, fused_recipe
from qtool import api
from qtool.io.data import DataFolder, model_inputs
from qtool.quantization.algorithms.outliers import OUTLIER_DB, handle_outliers
from qtool.quantization.plan import select_tensors
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session, run

RNG = np.random.default_rng(18)


def outlier_channel_model(k: int = 16, n: int = 8):
    """x [N, 4, k] -> LayerNorm -> t -> MatMul -> Add(bias) -> y. The LayerNorm's scale makes channel 5 of t
    100x the others and that channel's weight row is 1/100 of the others: every channel counts alike in y,
    but one uint8 range for t leaves the 15 ordinary channels a couple of steps."""
    gamma = np.ones(k, np.float32)
    gamma[5] = 100.0
    weight = RNG.normal(size=(k, n)).astype(np.float32)
    weight[5] /= 100.0
    weights = {"gamma": gamma, "beta": (0.1 * RNG.normal(size=k)).astype(np.float32), "w": weight,
               "bias": RNG.normal(size=n).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["t"], name="ln", axis=-1),
             helper.make_node("MatMul", ["t", "w"], ["m"], name="dense"),
             helper.make_node("Add", ["m", "bias"], ["y"], name="dense_bias")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, n])], weights, opset=17)


def variance_model():
    """x [N, 16] -> x*x -> + eps -> Sqrt -> MatMul -> y: the LayerNorm-variance shape, where values spread
    over decades and the small ones matter as much as the large (Sqrt is a relative reader)."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
             helper.make_node("Add", ["sq", "eps"], ["var"], name="plus_eps"),
             helper.make_node("Sqrt", ["var"], ["root"], name="root"),
             helper.make_node("MatMul", ["root", "w"], ["y"], name="dense")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                      {"eps": np.array([1e-6], np.float32), "w": np.eye(16, dtype=np.float32)}, opset=17)


def _write(tmp_path, model, samples):
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, save_npy_folder(tmp_path / "data", samples)


def test_equalization_keeps_the_float_function_and_lifts_the_estimate(tmp_path):
    x = RNG.normal(size=(8, 1, 4, 16)).astype(np.float32)
    path, folder = _write(tmp_path, outlier_channel_model(), x)
    model, _ = api.prepare(path)  # shapes inferred: the selection knows t is float
    data = DataFolder(folder, model_inputs(model))
    feeds = {"x": x[:, 0]}
    before = run(make_session(model, optimize=False), feeds)["y"]
    recipe = fused_recipe()
    model, outcome = handle_outliers(model, select_tensors(model, recipe), data, batch_size=4)
    assert Recipe().quantization.algorithms.outliers == "auto"  # the default, measured (README)
    after = run(make_session(model, optimize=False), feeds)["y"]
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))  # x W = (x / s)(diag(s) W)
    [found] = outcome.tensors
    assert (found.tensor, found.handling, found.producer, found.readers) == ("t", "equalized", "ln", ("dense",))
    assert found.estimated_db < OUTLIER_DB <= found.estimated_db_after
    assert found.channel_ratio > 20
    assert outcome.keep_float == {}


def test_quantize_handles_the_outlier_channel_reports_it_and_is_deterministic(tmp_path):
    path, data = _write(tmp_path, outlier_channel_model(), RNG.normal(size=(16, 1, 4, 16)))
    sqnr, models = {}, {}
    for setting in ("off", "auto", "auto"):
        recipe = Recipe.model_validate({"quantization": {"placement": "fused", "algorithms": {"outliers": setting}}})
        result = api.quantize(path, data, recipe)
        section = result.report["algorithms"]["outliers"]
        sqnr[setting] = result.report["validation"]["outputs"]["y"]["sqnr_db"]
        if setting == "auto" and setting in models:
            assert result.model.SerializeToString() == models[setting]  # same inputs, byte-identical model
        models[setting] = result.model.SerializeToString()
        assert [(t["tensor"], t["handling"]) for t in section["tensors"]] == ([] if setting == "off" else
                                                                              [("t", "equalized")])
    assert sqnr["auto"] > sqnr["off"] + 10, sqnr
    from qtool.reporting.markdown import render_markdown

    assert "| outliers | 1 outlier tensors of" in render_markdown(result.report)


def test_a_relative_reader_keeps_its_outlier_input_float(tmp_path):
    x = np.exp(RNG.uniform(-7, 0, size=(32, 1, 16))) * RNG.choice([-1, 1], size=(32, 1, 16))
    path, data = _write(tmp_path, variance_model(), x)
    results = {setting: api.quantize(path, data, Recipe.model_validate(
        {"quantization": {"placement": "fused", "algorithms": {"outliers": setting}}})) for setting in ("off", "auto")}
    section = results["auto"].report["algorithms"]["outliers"]
    assert {(t["tensor"], t["handling"]) for t in section["tensors"]} >= {("var", "float")}
    kept = {d["node"]: d["reason"] for d in results["auto"].report["plan"]["nodes"] if not d["quantized"]}
    assert "outliers" in kept["root"]
    sqnr = {k: r.report["validation"]["outputs"]["y"]["sqnr_db"] for k, r in results.items()}
    assert sqnr["auto"] > sqnr["off"] + 6, sqnr


def test_with_a_calibration_table_outliers_are_skipped_with_a_note(tmp_path):
    path, data = _write(tmp_path, outlier_channel_model(), RNG.normal(size=(8, 1, 4, 16)))
    recipe = Recipe.model_validate({"quantization": {"placement": "fused", "algorithms": {"outliers": "auto"}}})
    table = api.calibrate(path, data, recipe, tmp_path / "table.json")
    result = api.quantize(path, None, recipe, calibration=table.output, validation_data=data)
    section = result.report["algorithms"]["outliers"]
    assert section["enabled"] is False and "needs calibration data" in section["skipped"]
