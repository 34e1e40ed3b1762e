"""A Concat of tensors whose ranges differ by orders of magnitude (every YOLO-style head): the placement
keeps each part on its own scale, and the per-slice figures catch a collapsed part that the whole hides."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from conftest import fused_recipe, make_model, save_npy_folder
from qtool import api
from qtool.evaluation.compare import Comparison, GateResult, OutputStats, check_gates, feature_axis
from qtool.quantization import joins
from qtool.recipe.load import load_recipe

CLASSES, ANCHORS = 16, 64
RECIPE = "version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_cosine: 0.99, min_slice_sqnr_db: 15}\n"


def yolo_head(seed: int = 0) -> onnx.ModelProto:
    """x [N, 8, anchors] -> boxes in pixels (0..650) and sigmoid class scores (0..1), joined on axis 1."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "wb", "bb"], ["box_logits"], name="box_conv"),
        helper.make_node("Sigmoid", ["box_logits"], ["box_unit"], name="box_sigmoid"),
        helper.make_node("Mul", ["box_unit", "image_size"], ["boxes"], name="box_scale"),
        helper.make_node("Conv", ["x", "wc", "bc"], ["class_logits"], name="class_conv"),
        helper.make_node("Sigmoid", ["class_logits"], ["scores"], name="class_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], name="head_concat", axis=1),
    ]
    weights = {"wb": (rng.normal(size=(4, 8, 1)) / np.sqrt(8)).astype(np.float32), "bb": np.zeros(4, np.float32),
               "image_size": np.array(650.0, np.float32),
               "wc": (rng.normal(size=(CLASSES, 8, 1)) / np.sqrt(8)).astype(np.float32),
               "bc": np.full(CLASSES, -2.0, np.float32)}  # most scores low, some above 0.25, as in a detector
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, ANCHORS])],
                      [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + CLASSES, ANCHORS])],
                      weights)


def quantize_head(tmp_path):
    path = tmp_path / "head.onnx"
    model = yolo_head()
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "calib", np.random.default_rng(1).normal(size=(16, 1, 8, ANCHORS)))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return model, api.quantize(path, data, load_recipe(tmp_path / "recipe.yaml"))


def scores(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0][:, 4:]


def test_yolo_head_keeps_its_class_scores(tmp_path):
    model, result = quantize_head(tmp_path)
    concat = next(node for node in result.report["plan"]["nodes"] if node["node"] == "head_concat")
    assert not concat["quantized"] and "ranges differ" in concat["reason"] and "scores" in concat["reason"]
    assert any(note.startswith("head_concat: kept float") for note in result.report["plan"]["notes"])
    # each part keeps its own scale (its producer's output Q/DQ); the joined output is not requantized
    quantize_inputs = {node.input[0] for node in result.model.graph.node if node.op_type == "QuantizeLinear"}
    assert {"boxes", "scores"} <= quantize_inputs
    assert next(node for node in result.model.graph.node if node.output[0] == "output0").op_type == "Concat"
    x = np.random.default_rng(2).normal(size=(8, 8, ANCHORS)).astype(np.float32)
    float_scores, quant_scores = scores(model, x), scores(result.model, x)
    kept, found = int(np.sum(float_scores > 0.25)), int(np.sum(quant_scores > 0.25))
    assert kept > 100  # the head detects something
    assert abs(found - kept) <= 0.05 * kept  # and the quantized head detects the same
    error = np.abs(quant_scores - float_scores)  # steps of 0..1 / 255, not of 0..650 / 255
    assert np.mean(error) < 0.005 and np.max(error) < 0.1
    worst = result.report["validation"]["outputs"]["output0"]["worst_slice"]
    assert worst["axis"] == 1 and worst["slices"] == 4 + CLASSES and worst["sqnr_db"] > 15
    assert result.passed


def test_one_scale_for_the_whole_head_fails_the_slice_gate_only(tmp_path, monkeypatch):
    """The old placement (one uint8 scale over boxes and scores): every score rounds to 0, the
    whole-output cosine still passes, the worst slice names a score channel at 0 dB."""
    monkeypatch.setattr(joins, "MIN_JOINED_STEPS", 0)
    model, result = quantize_head(tmp_path)
    x = np.random.default_rng(2).normal(size=(8, 8, ANCHORS)).astype(np.float32)
    assert int(np.sum(scores(model, x) > 0.25)) > 100 and int(np.sum(scores(result.model, x) > 0.25)) == 0
    gates = {gate.name: gate for gate in result.gates}
    assert gates["min_cosine"].passed and gates["min_cosine"].value > 0.9999
    assert not gates["min_slice_sqnr_db"].passed and gates["min_slice_sqnr_db"].value < 1.0
    worst = result.report["validation"]["outputs"]["output0"]["worst_slice"]
    assert worst["axis"] == 1 and worst["index"] >= 4 and worst["sqnr_db"] < 1.0


def test_concat_of_similar_ranges_stays_quantized(tmp_path):
    """Two branches within 16x of each other: one scale serves both, the Concat stays integer."""
    rng = np.random.default_rng(3)
    model = make_model(
        [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
         helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
         helper.make_node("Concat", ["a", "b"], ["y"], name="join", axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, ANCHORS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, ANCHORS])],
        {"wa": rng.normal(size=(4, 8, 1)).astype(np.float32), "wb": (rng.normal(size=(4, 8, 1)) / 4).astype(np.float32)})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "calib", rng.normal(size=(8, 1, 8, ANCHORS)))
    result = api.quantize(path, data, fused_recipe())
    join = next(node for node in result.report["plan"]["nodes"] if node["node"] == "join")
    assert join["quantized"] and join["reason"] == "rule Concat"


def test_feature_axis_of_common_outputs():
    assert feature_axis((1, 84, 8400)) == 1  # YOLOv8
    assert feature_axis((1, 25200, 85)) == 2  # YOLOv5
    assert feature_axis((4, 589, 7)) == 2  # per-frame classes
    assert feature_axis((8, 10)) == 1 and feature_axis((2, 3, 32, 32)) == 1
    assert feature_axis((8, 1)) is None and feature_axis((8,)) is None and feature_axis((1, 1, 32, 32)) is None


def test_worst_slice_is_streamed_over_batches_and_feeds_the_gate():
    rng = np.random.default_rng(0)
    stats = OutputStats()
    for _ in range(3):
        ref = rng.normal(size=(4, 5, 10))
        cand = ref.copy()
        cand[:, 3] *= 0.5  # channel 3 at half its value: noise power 1/4 of the signal's
        cand[:, :3] += 1e-3 * rng.normal(size=(4, 3, 10))
        stats.update(ref, cand)
    figures = stats.figures()
    worst = figures["worst_slice"]
    assert worst["axis"] == 1 and worst["index"] == 3 and worst["slices"] == 5
    assert abs(worst["sqnr_db"] - 10 * np.log10(4)) < 1e-9
    assert figures["sqnr_db"] > worst["sqnr_db"]
    no_axis = OutputStats()
    no_axis.update(np.arange(1.0, 9.0).reshape(8, 1), np.arange(1.0, 9.0).reshape(8, 1) * 1.1)
    comparison = Comparison(8, {"boxes": figures, "score": no_axis.figures()})
    assert no_axis.figures()["worst_slice"] is None
    # an output without a feature axis is one slice: its whole SQNR (20 dB) counts
    assert abs(comparison.figure("slice_sqnr_db") - worst["sqnr_db"]) < 1e-9
    gate, = check_gates(comparison, {"min_slice_sqnr_db": 6.5})
    assert gate == GateResult("min_slice_sqnr_db", 6.5, comparison.figure("slice_sqnr_db"), False)
    only_score = Comparison(8, {"score": no_axis.figures()})
    assert abs(only_score.figure("slice_sqnr_db") - 20.0) < 1e-9


def test_an_all_zero_input_does_not_split_a_concat(tmp_path):
    """Zero is exact under any scale: a Concat with a zero-filled input stays quantized."""
    rng = np.random.default_rng(4)
    model = make_model(
        [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
         helper.make_node("Mul", ["x", "zero"], ["z"], name="mask"),
         helper.make_node("Concat", ["a", "z"], ["y"], name="join", axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, ANCHORS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, ANCHORS])],
        {"wa": rng.normal(size=(4, 8, 1)).astype(np.float32), "zero": np.zeros((1, 1, 1), np.float32)})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    # placement all: ORT has no integer Concat here, and this is about the shared scale, not speed
    (tmp_path / "recipe.yaml").write_text("version: 1\nquantization: {placement: all}\n")
    result = api.quantize(path, save_npy_folder(tmp_path / "calib", rng.normal(size=(8, 1, 8, ANCHORS))),
                          load_recipe(tmp_path / "recipe.yaml"))
    join = next(node for node in result.report["plan"]["nodes"] if node["node"] == "join")
    assert join["quantized"], join["reason"]
