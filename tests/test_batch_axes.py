"""Batch axes read from the model: fixed-batch, scalar, state and flag inputs quantize with the shipped recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import ROOT, make_model, untimed_recipe
from qtool.io.batching import BatchAxis, InputSpec, batch_axes

F32 = np.dtype(np.float32)


def qtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("shapes, expected", [
    ({"x": ("N", 3, 8, 8)}, {"x": 0}),
    ({"input": ("batch", 64), "state": (2, "batch", 16), "sr": ()}, {"input": 0, "state": 1, "sr": None}),
    ({"x": (1, 3, 32, 32)}, {"x": 0}),
    ({"x": ("batch", 64), "flag": (1,)}, {"x": 0, "flag": None}),
    ({"ids": ("batch", "seq"), "mask": ("batch", "seq")}, {"ids": 0, "mask": 0}),
    ({"a": ("unk__1", 4), "b": (2, None, 4)}, {"a": 0, "b": 1}),  # names not shared: first symbolic dim
    ({"x": (-1, 3, None, None)}, {"x": 0}),  # PaddlePaddle's -1
    ({"x": (3, 4)}, {"x": None}),
])
def test_batch_axis_is_read_from_the_declared_shapes(shapes, expected):
    axes = batch_axes([InputSpec(name, F32, shape) for name, shape in shapes.items()])
    assert {name: axis.axis for name, axis in axes.items()} == expected
    assert all(axis.reason for axis in axes.values())
    assert axes.get("x", BatchAxis(0, "")).fixed == (shapes.get("x") == (1, 3, 32, 32))


def _fixed_batch_cnn(reshape_to: list[int]) -> object:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["flat"]),  # [1, 16]: the batch is fixed in the graph
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], transB=1),
    ]
    weights = {
        "w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32) / 5, "b1": rng.normal(size=8).astype(np.float32) / 10,
        "w2": rng.normal(size=(16, 8, 3, 3)).astype(np.float32) / 8, "b2": rng.normal(size=16).astype(np.float32) / 10,
        "shape": np.array(reshape_to, np.int64),
        "w3": rng.normal(size=(10, 16)).astype(np.float32) / 4, "b3": np.zeros(10, np.float32),
    }
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], weights)


@pytest.mark.parametrize("reshape", ["fixed", "flexible"])
def test_fixed_batch_cnn_quantizes_with_the_shipped_recipe(tmp_path, reshape):
    """Batch 1 declared: with a Reshape to [1, 16] the symbolic-batch copy does not run and
    calibration runs one sample per run; with [-1, 16] the copy checks out and runs take 8."""
    model = _fixed_batch_cnn([1, 16] if reshape == "fixed" else [-1, 16])
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(12):
        np.save(calib / f"{i:03d}.npy", rng.normal(size=(1, 3, 32, 32)).astype(np.float32))
    result = qtool("quantize", str(tmp_path / "model.onnx"), "--recipe", str(untimed_recipe(tmp_path)),
                   "--data", str(calib), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validation"]["outputs"]["y"]["sqnr_db"] >= 30
    batching = report["calibration"]["batching"]
    assert batching["inputs"]["x"]["axis"] == 0
    if reshape == "fixed":
        assert batching["inputs"]["x"]["fixed"] and batching["samples_per_run"] == 1
        assert "one sample per run" in batching["notes"][0] and "does not run" in batching["notes"][0]
    else:
        assert not batching["inputs"]["x"]["fixed"] and batching["samples_per_run"] == 8
        assert "symbolic batch dimension" in batching["notes"][0]


def _state_model() -> object:
    """input [batch, 64] → MatMul, + sum over state [2, batch, 16], × sr/16000; a bool scalar flag picks
    Relu or Neg in an If."""
    rng = np.random.default_rng(2)
    then_graph = helper.make_graph([helper.make_node("Relu", ["scaled"], ["then_y"])], "then", [],
                                   [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["batch", 16])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["scaled"], ["else_y"])], "else", [],
                                   [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["batch", 16])])
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"]),
        helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
        helper.make_node("Add", ["h", "s"], ["a"]),
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_f", "rate"], ["k"]),
        helper.make_node("Mul", ["a", "k"], ["scaled"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 16]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])]
    weights = {"w": rng.normal(size=(64, 16)).astype(np.float32) / 8, "axes0": np.array([0], np.int64),
               "rate": np.array(16000, np.float32)}
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], weights)


def test_state_scalar_and_flag_inputs_quantize_with_the_shipped_recipe(tmp_path):
    model = _state_model()
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    rng = np.random.default_rng(3)
    calib = tmp_path / "calib"
    calib.mkdir()
    samples = []
    for i in range(12):  # one sample per file, no batch axis; the flag changes half-way
        sample = {"input": rng.normal(size=64).astype(np.float32), "state": rng.normal(size=(2, 16)).astype(np.float32),
                  "sr": np.array(16000, np.int64), "flag": np.array(i < 6)}
        np.savez(calib / f"{i:03d}.npz", **sample)
        samples.append(sample)
    result = qtool("quantize", str(tmp_path / "model.onnx"), "--recipe", str(untimed_recipe(tmp_path)),
                   "--data", str(calib), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    inputs = report["calibration"]["batching"]["inputs"]
    assert {name: entry["axis"] for name, entry in inputs.items()} == {"input": 0, "state": 1, "sr": None,
                                                                        "flag": None}
    assert "scalar" in inputs["sr"]["reason"]
    float_session = ort.InferenceSession((tmp_path / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    quant_session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    for sample in (samples[0], samples[-1]):
        feeds = {"input": sample["input"][None], "state": sample["state"][:, None], "sr": sample["sr"],
                 "flag": sample["flag"]}
        want, = float_session.run(None, feeds)
        got, = quant_session.run(None, feeds)
        assert np.allclose(got, want, atol=0.05 * np.abs(want).max())


def test_a_sample_the_fixed_batch_model_cannot_run_is_a_data_error_naming_its_file(tmp_path):
    """The symbolic-batch copy's check ran the float model on the first samples outside the loop that
    names files: an index out of range in the data became exit 3 (Internal error)."""
    from click.testing import CliRunner

    from qtool.cli.main import main

    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2])],
        {"table": rng.normal(size=(10, 3)).astype(np.float32), "w": rng.normal(size=(3, 2)).astype(np.float32)},
    )
    onnx.save(model, tmp_path / "model.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    np.save(data / "0000.npy", np.array([[1, 2, 3, 4]], np.int64))
    np.save(data / "0001.npy", np.array([[1, 2, 3, 99]], np.int64))  # no row 99 in a 10-row table
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "model.onnx"), "--data", str(data),
                                       "--output", str(tmp_path / "out"), "--no-bench"])
    assert result.exit_code == 2, result.output
    assert "0001.npy" in result.stderr and "Internal error" not in result.stderr
