"""minmax measured inside the graph (calibration/reductions.py): the tables of exposing whole tensors, bit for bit,
with none of them exposed."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from onnx import ModelProto, TensorProto, helper

import qtool
from conftest import make_model, save_npy_folder, shared_model
from qtool.calibration import reductions, shards
from qtool.io.data import DataFolder, model_inputs
from qtool.numerics import QTYPES
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import CalibrationSpec
from qtool.runtime.session import make_session

calibrate_module = importlib.import_module("qtool.calibration.calibrate")  # `qtool.calibrate` is the api function
TENSORS = ["x", "mm", "act", "y"]  # y is also the model's output


def tables(model, folder, spec: CalibrationSpec, monkeypatch, tensors=TENSORS, budget: int | None = None):
    """(in the graph, exposed whole) tables of `tensors`, and the names each run of the first returned."""
    if budget is not None:
        monkeypatch.setattr(calibrate_module, "MEMORY_BUDGET", budget)
    returned, real_run = [], calibrate_module.run

    def recording_run(session, feeds):
        outputs = real_run(session, feeds)
        returned.append(set(outputs))
        return outputs

    found = []
    for methods in (reductions.IN_GRAPH_METHODS, set()):
        monkeypatch.setattr(reductions, "IN_GRAPH_METHODS", methods)
        monkeypatch.setattr(calibrate_module, "run", recording_run if methods else real_run)
        table = calibrate_module.calibrate(model, tensors, DataFolder(folder, model_inputs(model)), spec,
                                           QTYPES["uint8"], False)
        found.append({"samples": table.samples, "batching": table.batching,
                      "ranges": {name: (r.lo, r.hi, r.method, r.summary) for name, r in table.ranges.items()}})
    return found[0], found[1], returned


@pytest.mark.parametrize("spec, budget", [
    (CalibrationSpec(method="minmax", batch_size=1), None),
    (CalibrationSpec(method="minmax", batch_size=16, moving_average=0.9), None),  # follows the runs
    (CalibrationSpec(method="minmax", batch_size=16), 16 * 64 * 4 * 4 * 3),  # runs of 3 samples
    (CalibrationSpec(method="minmax", batch_size=16, overrides=[{"tensor": "mm", "method": "percentile"}]),
     10_000),  # mm exposed, one pass per group of what is exposed
])
def test_in_graph_minmax_table_is_the_exposed_one(tiny, monkeypatch, spec, budget):
    model, folder = tiny
    in_graph, exposed, returned = tables(model, folder, spec, monkeypatch, budget=budget)
    assert in_graph == exposed
    minmax = {name for name in TENSORS if spec.for_tensor(name).method == "minmax"}
    assert all(not (names & minmax - {"y"}) for names in returned)  # only the model's own output, whole
    assert in_graph["ranges"]["y"][3]["samples"] == 32


def test_each_tensor_is_observed_once_a_sample_whatever_the_passes(tiny, monkeypatch):
    """The model's own outputs come back with every pass; each pass observes only its group's tensors."""
    model, folder = tiny
    spec = CalibrationSpec(method="percentile", percentile=99.9, batch_size=16)
    _, exposed, _ = tables(model, folder, spec, monkeypatch, budget=10_000)  # a pass per tensor
    assert {name: r[3]["samples"] for name, r in exposed["ranges"].items()} == dict.fromkeys(TENSORS, 32)


@pytest.mark.parametrize("opset", [13, 18])  # 18: the Reduce ops take their axes as an input (none given here)
def test_nan_and_inf_never_widen_an_in_graph_range(tmp_path, monkeypatch, opset):
    """Log of data with zeros and negative values: -inf and nan in `logs`; those runs read it whole."""
    model = make_model([helper.make_node("Log", ["x"], ["logs"]), helper.make_node("Relu", ["logs"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], opset=opset)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 4.0, size=(12, 8)).astype(np.float32)
    x[3, 2], x[7, 5], x[7, 6] = 0.0, -1.0, 0.0  # log: -inf; nan and -inf
    folder = save_npy_folder(tmp_path / "data", x)
    for batch_size in (1, 4):
        in_graph, exposed, _ = tables(model, folder, CalibrationSpec(method="minmax", batch_size=batch_size),
                                      monkeypatch, tensors=["x", "logs"])
        assert in_graph == exposed
        lo, hi = in_graph["ranges"]["logs"][:2]
        finite = np.log(x[x > 0])
        assert (lo, hi) == (float(finite.min()), float(finite.max()))


def test_add_to_places_four_tiny_outputs_right_after_each_producer(tiny):
    """Reductions listed where the tensor is made (run in order, they free it when its own consumers do)."""
    model, _ = tiny
    copy = ModelProto()
    copy.CopyFrom(model)
    measuring = reductions.InGraphMinMax(["x", "mm", "act"])
    added = measuring.add_to(copy)
    assert [value.name for value in added.graph.output] == [
        "y", *(names[part] for names in measuring.outputs.values() for part, _ in reductions.PARTS)]
    ops = [op for _, op in reductions.PARTS]
    assert [node.op_type for node in added.graph.node] == [*ops, "MatMul", *ops, "Add", *ops, "Relu"]
    session = make_session(added, optimize=False, in_order=True)
    feeds = {"x": np.ones((2, 16, 64), np.float32)}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert [outputs[measuring.outputs["x"][part]].tolist() for part in ("lo", "hi", "total", "shape")] == [
        1.0, 1.0, 2048.0, [2, 16, 64]]


def test_real_model_minmax_table_is_byte_identical(tmp_path, monkeypatch):
    """ppocr_cls (opset 11, 8 samples): the table file of `qtool calibrate`, in the graph and exposed whole."""
    model = shared_model("ppocr_cls")
    recipe = load_recipe(qtool.__path__[0] + "/recipe/presets/ppocr_cls.yaml")
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"samples": 8})})
    texts = []
    for methods in (reductions.IN_GRAPH_METHODS, set()):
        monkeypatch.setattr(reductions, "IN_GRAPH_METHODS", methods)
        out = tmp_path / f"table-{len(methods)}.json"
        qtool.calibrate(model / "model.onnx", model / "calib", recipe, out)
        texts.append(out.read_text())
    assert texts[0] == texts[1]
    assert len(json.loads(texts[0])["tensors"]) > 50


@pytest.mark.parametrize("budget, note", [(10**9, "ran on a copy with a symbolic batch"),
                                          (10_000, "runs of one sample are what")])
def test_a_fixed_batch_model_is_copied_only_where_samples_can_share_runs(tmp_path, monkeypatch, budget, note):
    """The symbolic-batch copy is checked by running the model (u2netp: 7 s, 925 MB peak): not where the
    memory budget allows one sample a run anyway."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])])
    x = np.random.default_rng(2).normal(size=(6, 1, 16, 64)).astype(np.float32)
    folder = save_npy_folder(tmp_path / "data", x)
    monkeypatch.setattr(calibrate_module, "MEMORY_BUDGET", budget)
    table = calibrate_module.calibrate(model, ["x", "y"], DataFolder(folder, model_inputs(model)),
                                       CalibrationSpec(method="minmax", batch_size=4), QTYPES["uint8"], False)
    assert table.samples == 6 and table.batching["samples_per_run"] == (4 if budget > 10_000 else 1)
    assert any(note in line for line in table.batching["notes"])
    assert (table.ranges["x"].lo, table.ranges["x"].hi, table.ranges["y"].lo) == (float(x.min()), float(x.max()), 0.0)
    monkeypatch.setattr(shards, "MEMORY_BUDGET", budget)
    sharded = shards.calibrate_sharded(model, ["x", "y"], DataFolder(folder, model_inputs(model)),
                                       CalibrationSpec(method="minmax", batch_size=4), QTYPES["uint8"], False,
                                       InProcessTasks())
    assert (sharded.batching, sharded.ranges) == (table.batching, table.ranges)


class InProcessTasks:
    """calibrate_sharded's executor seam, run here (tests/test_shards.py has the full one)."""

    jobs = 2

    def put(self, value):
        return value

    def map_unordered(self, fn, tasks):
        return [(task, fn(task)) for task in tasks]
