"""bench/accuracy.py's logits column: the Softmax input found through reshapes and Q/DQ pairs, and its
SQNR taken on per-sample centred logits (a shift common to every class is no error: Softmax ignores it)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import accuracy  # noqa: E402


def classifier(weight: np.ndarray, offset: float = 0.0):
    """x [1, 4] -> Gemm -> (+ offset) -> Reshape [1, 3] -> Softmax -> Identity -> probabilities."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc"),
             helper.make_node("Add", ["g", "offset"], ["logits"], name="shift"),
             helper.make_node("Reshape", ["logits", "shape"], ["flat"], name="flat"),
             helper.make_node("Softmax", ["flat"], ["soft"], name="softmax", axis=1),
             helper.make_node("Identity", ["soft"], ["probabilities"], name="out")]
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"),
         numpy_helper.from_array(np.float32(offset), "offset"),
         numpy_helper.from_array(np.array([1, 3], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_softmax_input_is_found_through_reshape_and_identity():
    model = classifier(np.eye(4, 3))
    assert accuracy.softmax_input(model, "probabilities") == ("flat", 1)
    assert accuracy.softmax_input(model, "nothing") is None


def test_logits_sqnr_ignores_a_common_shift_and_measures_the_rest():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3))
    samples = [("s", {"x": rng.standard_normal((1, 4)).astype(np.float32)}) for _ in range(8)]
    reference = classifier(weight)
    assert accuracy.logits_sqnr(reference, classifier(weight, offset=5.0), samples, "probabilities") > 100
    noisy = weight + 0.01 * rng.standard_normal(weight.shape)
    figure = accuracy.logits_sqnr(reference, classifier(noisy), samples, "probabilities")
    assert 20 < figure < 60


def test_sqnr_interval_brackets_the_figure_and_is_reproducible():
    rng = np.random.default_rng(1)
    reference = [{"y": rng.standard_normal(4)} for _ in range(40)]
    candidate = [{"y": r["y"] + 0.1 * rng.standard_normal(4) * (1 + 5 * (k < 2))} for k, r in enumerate(reference)]
    figure = accuracy.sqnr(reference, candidate)["y"]
    low, high = accuracy.sqnr_interval(reference, candidate, "y")
    assert low < figure < high
    assert (low, high) == accuracy.sqnr_interval(reference, candidate, "y")
