"""Stateful models: `data.state` makes calibration and validation run each file as a stream, the state
outputs fed back as the next chunk's state inputs (a tiny recurrent cell built here, real ORT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import fused
import qtool
from qtool.errors import RecipeError
from qtool.io.feeds import open_data
from qtool.io.samples import model_inputs
from qtool.recipe.load import parse_recipe
from qtool.runtime.session import make_session, run
from qtool.runtime.streams import StateCarry

IN, HIDDEN, OUT = 6, 16, 4


def _cell(path: Path) -> Path:
    """h_out = tanh(x W + (h U + b)); y = h_out V: one chunk of a recurrent model, state in and out."""
    rng = np.random.default_rng(0)
    weights = {"W": rng.normal(0, 0.5, (IN, HIDDEN)), "U": rng.normal(0, 0.3, (HIDDEN, HIDDEN)),
               "b": rng.normal(0, 0.1, (HIDDEN,)), "V": rng.normal(0, 0.5, (HIDDEN, OUT))}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="in"),
             helper.make_node("Gemm", ["h", "U", "b"], ["hu"], name="rec"),
             helper.make_node("Add", ["xw", "hu"], ["pre"], name="sum"),
             helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh"),
             helper.make_node("MatMul", ["h_out", "V"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, "cell",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUT]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, HIDDEN])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _streams(folder: Path, count: int, seed: int) -> Path:
    """`count` files, each one stream of 24 chunks stacked along the batch axis."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        np.save(folder / f"{index:02d}.npy", rng.normal(0, 1, (24, IN)).astype(np.float32))
    return folder


def _recipe(folder: Path, extra: str = "") -> Path:
    path = folder / "stateful.yaml"
    path.write_text(fused("version: 1\ndata:\n  state:\n    carry: {h: h_out}\n" + extra))  # see conftest.FUSED
    return path


def _streamed(model_path: Path, stream: np.ndarray) -> list[np.ndarray]:
    """The reference: the model run chunk by chunk by hand, its state fed back."""
    session = make_session(onnx.load(model_path))
    state = np.zeros((1, HIDDEN), np.float32)
    outputs = []
    for chunk in stream:
        out = run(session, {"x": chunk[None], "h": state})
        state = out["h_out"]
        outputs.append(out["y"])
    return outputs


def test_each_file_is_a_stream_whose_state_is_carried(tmp_path):
    model_path = _cell(tmp_path / "cell.onnx")
    data = _streams(tmp_path / "calib", 2, seed=1)
    recipe = parse_recipe(_recipe(tmp_path).read_text(), tmp_path / "stateful.yaml")
    source = open_data(data, model_inputs(onnx.load(model_path)), None, recipe)
    batches = list(source.batches(8))
    assert [batch.count for batch in batches] == [1] * 48  # one chunk per run, in order
    assert [batch.starts[0] for batch in batches] == ([True] + [False] * 23) * 2
    carry, session = StateCarry(source.state), make_session(onnx.load(model_path))
    got = [carry.run(lambda feeds: run(session, feeds), batch)["y"] for batch in batches]
    for index in range(2):
        want = _streamed(model_path, np.load(data / f"{index:02d}.npy"))
        np.testing.assert_allclose(np.concatenate(got[24 * index:24 * (index + 1)]), np.concatenate(want),
                                   rtol=1e-5, atol=1e-6)


def test_stateful_calibration_and_streamed_validation(tmp_path):
    model_path = _cell(tmp_path / "cell.onnx")
    calib, evaluation = _streams(tmp_path / "calib", 4, seed=1), _streams(tmp_path / "eval", 3, seed=2)
    recipe = _recipe(tmp_path, "validation:\n  gates: {min_cosine: 0.99}\n")
    result = qtool.quantize(model_path, calib, recipe, tmp_path / "out", validation_data=evaluation)
    outputs = result.report["validation"]["outputs"]
    assert result.report["validation"]["samples"] == 72  # every chunk of every stream, compared chunk by chunk
    assert outputs["y"]["cosine"] >= 0.99 and outputs["h_out"]["cosine"] >= 0.99
    assert result.passed
    table = qtool.calibrate(model_path, calib, recipe).table
    lo, hi = table.ranges["h"].lo, table.ranges["h"].hi
    assert table.batching["samples_per_run"] == 1 and table.samples == 96
    assert "state fed back (h <- h_out)" in " ".join(table.batching["notes"])
    assert lo < -0.5 and hi > 0.5  # the carried state, not the zeros every stream starts from


def test_state_names_are_checked(tmp_path):
    model_path = _cell(tmp_path / "cell.onnx")
    calib = _streams(tmp_path / "calib", 1, seed=1)
    bad_input = tmp_path / "bad_input.yaml"
    bad_input.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  state:\n    carry: {hidden: h_out}\n")
    with pytest.raises(RecipeError, match=r"data\.state\.carry: 'hidden' is not a model input"):
        qtool.calibrate(model_path, calib, bad_input)
    bad_output = tmp_path / "bad_output.yaml"
    bad_output.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  state:\n    carry: {h: state_out}\n")
    with pytest.raises(RecipeError, match=r"data\.state\.carry: 'state_out' is not an output of the model"):
        qtool.calibrate(model_path, calib, bad_output)


def test_state_errors_name_the_recipe_and_its_key(tmp_path):
    """A wrong first state, a carry whose output does not fit, a state array in a data file: each error
    names the recipe file and the data.state key (they named only the data file, or nothing)."""
    from qtool.errors import DataError

    model_path = _cell(tmp_path / "cell.onnx")
    calib = _streams(tmp_path / "calib", 1, seed=1)
    recipe = tmp_path / "r.yaml"
    np.savez(tmp_path / "h0.npz", h=np.zeros((1, 8), np.float32))
    cases = {
        "    carry: {h: h_out}\n    initial: h0.npz\n":
            rf"{recipe}: data\.state\.initial .*h0\.npz: h has shape \[1, 8\]; the state input is h: float32 \[1, 16\]",
        "    carry: {h: h_out}\n    initial: none.npz\n": rf"{recipe}: data\.state\.initial: no such file .*none\.npz",
        "    carry: {h: y}\n": rf"{recipe}: data\.state\.carry: \{{h: y\}}: output y has shape \[1, 4\], state input h "
                             r"takes \[1, 16\]; name the output that returns h's next value",
        "    carry: {h: state_out}\n": rf"{recipe}: data\.state\.carry: 'state_out' is not an output of the model",
    }
    for text, message in cases.items():
        recipe.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  state:\n" + text)
        with pytest.raises(RecipeError, match=message):
            qtool.calibrate(model_path, calib, recipe)
    np.savez(tmp_path / "stream.npz", x=np.zeros((4, IN), np.float32), h=np.zeros((1, 3), np.float32))
    recipe.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  state:\n    carry: {h: h_out}\n")
    with pytest.raises(DataError, match=rf"stream\.npz \(state input h: data\.state\.carry in {recipe}\): array of "
                                        r"shape \[1, 3\] does not fit input h"):
        qtool.calibrate(model_path, tmp_path / "stream.npz", recipe)


def test_initial_state_from_a_file(tmp_path):
    model_path = _cell(tmp_path / "cell.onnx")
    data = _streams(tmp_path / "calib", 1, seed=1)
    np.savez(tmp_path / "h0.npz", h=np.full((1, HIDDEN), 0.5, np.float32))
    recipe = parse_recipe(_recipe(tmp_path, "    initial: h0.npz\n").read_text(), tmp_path / "stateful.yaml")
    source = open_data(data, model_inputs(onnx.load(model_path)), None, recipe)
    first = next(source.batches(1))
    np.testing.assert_array_equal(first.feeds["h"], np.full((1, HIDDEN), 0.5, np.float32))


def test_bias_correction_measures_on_the_streams(tmp_path):
    """The algorithms' measuring pass carries the state too: the Gemm that reads it gets a correction."""
    model_path = _cell(tmp_path / "cell.onnx")
    calib = _streams(tmp_path / "calib", 3, seed=1)
    recipe = _recipe(tmp_path, "quantization:\n  algorithms: {bias_correction: true}\n")
    result = qtool.quantize(model_path, calib, recipe)
    layer, = result.report["algorithms"]["bias_correction"]["layers"]
    assert layer["node"] == "rec"  # reads the state: with zeros every chunk, its weight error would shift nothing
    assert layer["max_abs_shift"] > 1e-4
    assert result.report["validation"]["outputs"]["y"]["cosine"] >= 0.99


def test_sensitivity_trials_stream_like_validation(tmp_path):
    """Each trial's quantized model carries its own state against the float model's streamed outputs: a
    trial fed the zero state every chunk would sit near 0 dB against them."""
    model_path = _cell(tmp_path / "cell.onnx")
    calib = _streams(tmp_path / "calib", 3, seed=1)
    rows = qtool.sensitivity(model_path, calib, _recipe(tmp_path), tmp_path / "sensitivity").rows
    assert {row["node"] for row in rows} >= {"in", "rec", "out"}
    assert all(row["sqnr_db"] > 25 for row in rows)


def test_sensitivity_samples_cannot_cut_a_stream(tmp_path):
    """--samples N ran each trial on the first N chunks while the float reference had carried state
    through whole streams: baseline 0 dB, a wrong ranking, exit 0. It is refused before any work."""
    from qtool.errors import UsageError

    model_path = _cell(tmp_path / "cell.onnx")
    calib = _streams(tmp_path / "calib", 3, seed=1)
    with pytest.raises(UsageError, match="--samples cannot cut a stateful model's streams"):
        qtool.sensitivity(model_path, calib, _recipe(tmp_path), tmp_path / "sensitivity", samples=2)
    with pytest.raises(UsageError, match="--sensitivity-samples cannot cut"):
        qtool.tune(model_path, calib, _recipe(tmp_path, "validation: {gates: {min_cosine: 0.99}}\n"),
                   tmp_path / "tuned", sensitivity_samples=2)
    assert not (tmp_path / "sensitivity").exists() and not (tmp_path / "tuned").exists()


def _lstm(path: Path, steps: int = 10) -> Path:
    """An ONNX LSTM run on chunks of `steps` frames, its state [1, batch, H] in and out (batch on axis 1,
    as recurrent exports have it), a MatMul head on its last hidden state."""
    rng = np.random.default_rng(3)
    weights = {"W": rng.normal(0, 0.4, (1, 4 * HIDDEN, IN)), "R": rng.normal(0, 0.25, (1, 4 * HIDDEN, HIDDEN)),
               "B": rng.normal(0, 0.1, (1, 8 * HIDDEN)), "V": rng.normal(0, 0.5, (HIDDEN, OUT)),
               "flat": np.array([-1, HIDDEN])}
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["", "h_n", "c_n"], hidden_size=HIDDEN),
             helper.make_node("Reshape", ["h_n", "flat"], ["last"]),
             helper.make_node("MatMul", ["last", "V"], ["y"], name="head")]
    state = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "batch", HIDDEN]) for name in ("h0", "c0")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT]),
               *(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "batch", HIDDEN]) for name in ("h_n", "c_n"))]
    graph = helper.make_graph(
        nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, "batch", IN]), *state], outputs,
        [numpy_helper.from_array(value.astype(np.int64 if name == "flat" else np.float32), name)
         for name, value in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_lstm_state_with_its_batch_on_axis_1_streams_through_quantize_and_per_layer(tmp_path):
    model_path = _lstm(tmp_path / "lstm.onnx")
    for split, seed in (("calib", 1), ("eval", 2)):
        (tmp_path / split).mkdir()
        rng = np.random.default_rng(seed)
        for index in range(3):  # one stream each: 12 chunks of 10 frames, stacked along the batch axis (1)
            np.save(tmp_path / split / f"{index}.npy", rng.normal(0, 1, (10, 12, IN)).astype(np.float32))
    recipe = tmp_path / "lstm.yaml"
    recipe.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  state:\n    carry: {h0: h_n, c0: c_n}\n")
    source = open_data(tmp_path / "eval", model_inputs(onnx.load(model_path)), None,
                       parse_recipe(recipe.read_text(), recipe))
    first = next(source.batches(8))
    assert first.feeds["x"].shape == (10, 1, IN) and first.feeds["h0"].shape == (1, 1, HIDDEN)
    result = qtool.quantize(model_path, tmp_path / "calib", recipe, validation_data=tmp_path / "eval", per_layer=True)
    assert result.report["validation"]["samples"] == 36
    assert all(figures["cosine"] >= 0.99 for figures in result.report["validation"]["outputs"].values())
    assert result.report["layers"]["activations"]


def test_an_npz_stream_may_bring_its_own_first_state(tmp_path):
    model_path = _cell(tmp_path / "cell.onnx")
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "s.npz", x=np.ones((5, IN), np.float32), h=np.full((1, HIDDEN), 0.5, np.float32))
    np.savez(tmp_path / "calib" / "t.npz", x=np.ones((5, IN), np.float32))
    recipe = parse_recipe(_recipe(tmp_path).read_text(), tmp_path / "stateful.yaml")
    source = open_data(tmp_path / "calib", model_inputs(onnx.load(model_path)), None, recipe)
    firsts = [batch.feeds["h"] for batch in source.batches(1) if batch.starts[0]]
    assert [float(h.mean()) for h in firsts] == [0.5, 0.0]
