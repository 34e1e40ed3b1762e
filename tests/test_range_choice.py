"""calibration.method auto: per tensor, the candidate range whose quantization disturbs the tensor's readers least."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import make_model, save_npy_folder
from qtool import api
from qtool.cli.main import main
from qtool.recipe.load import load_recipe
from qtool.reporting.schemas import report_schema
from qtool.runtime.session import make_session, run

WIDTH = 64
ROWS = 1024  # x is [N, 1024, 64]: 2M values over 32 samples, enough that 8-bit steps add up


def _model() -> onnx.ModelProto:
    """x [N, 1024, 64] -> MatMul -> Relu: x is quantized, the MatMul reads it."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(WIDTH, WIDTH)) / 8).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
                       helper.make_node("Relu", ["m"], ["y"], name="relu")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ROWS, WIDTH])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ROWS, WIDTH])], {"w": w})


def _quantize(tmp_path, data: np.ndarray, method: str, name: str = "run"):
    model_path = tmp_path / "model.onnx"
    if not model_path.exists():
        onnx.save(_model(), model_path)
    folder = tmp_path / "data"
    if not folder.exists():
        save_npy_folder(folder, data.reshape(4, -1, ROWS, WIDTH))  # 4 files of 8 samples
    recipe = tmp_path / f"{name}.yaml"
    # Ranges alone: outlier handling would keep minmax's outlier tensor x float (quantization.algorithms.outliers).
    recipe.write_text(f"version: 1\ncalibration: {{method: {method}}}\nquantization: {{algorithms: {{outliers: off}}}}\n")
    return api.quantize(model_path, folder, load_recipe(recipe))


def _error(model: onnx.ModelProto, data: np.ndarray) -> float:
    """Mean squared error of the output against the float model's, on `data`."""
    float_out = run(make_session(_model(), optimize=False), {"x": data})["y"]
    quant_out = run(make_session(model), {"x": data})["y"]
    return float(np.mean((quant_out.astype(np.float64) - float_out) ** 2))


def test_one_huge_outlier_gets_a_clipped_range_that_lowers_the_readers_error(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(32, ROWS, WIDTH)).astype(np.float32)
    data[3, 5, 7] = 400.0  # one value in 2M sets minmax's range: 100x the rest's spread
    auto = _quantize(tmp_path, data, "auto", "auto")
    minmax = _quantize(tmp_path, data, "minmax", "minmax")
    choice = auto.report["calibration"]["method_choice"]["per_tensor"]
    assert choice["per"] == "tensor" and choice["chosen"]["x"] != "minmax"
    assert sum(choice["wins"].values()) == len(choice["chosen"])
    assert _error(auto.model, data) < 0.5 * _error(minmax.model, data)
    assert choice["outliers"]["x"]["chosen"] == choice["chosen"]["x"] and choice["outliers"]["x"]["max_over_p99.99"] > 8
    assert auto.report["calibration"]["method_choice"]["chosen"] != "minmax"
    # a note (finding 17: README says so; it printed as a warning), in the report's calibration section
    note = auto.report["calibration"]["note"]
    assert "calibration.method auto chose" in note and "per tensor" in note
    assert not any("auto chose" in w for w in auto.report["warnings"])


def test_a_tensor_whose_rare_large_values_carry_the_signal_keeps_its_range(tmp_path):
    """0.05 % of the values are 20, the rest ~0.05: p99.9 would clip them to ~0.15 (far less error per
    step, far more in all), so the range kept reaches them: minmax, or a candidate within a step of it."""
    rng = np.random.default_rng(2)
    data = (rng.normal(size=(32, ROWS, WIDTH)) * 0.05).astype(np.float32)
    data.flat[rng.choice(data.size, data.size // 2000, replace=False)] = 20.0
    auto = _quantize(tmp_path, data, "auto", "auto")
    chosen = auto.report["calibration"]["method_choice"]["per_tensor"]["chosen"]["x"]
    table = api.calibrate(tmp_path / "model.onnx", tmp_path / "data", load_recipe(tmp_path / "auto.yaml")).table
    assert table.ranges["x"].summary["chosen"] == chosen and chosen != "p99.9"
    assert table.ranges["x"].hi > 20.0 - 20.0 / 255 and table.ranges["x"].summary["candidates"]["p99.9"][1] < 1.0


def test_the_choice_is_deterministic_and_the_table_says_what_each_tensor_chose(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.standard_t(3, size=(32, ROWS, WIDTH)).astype(np.float32)
    first = _quantize(tmp_path, data, "auto", "a")
    second = _quantize(tmp_path, data, "auto", "b")
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.report["calibration"]["method_choice"] == second.report["calibration"]["method_choice"]
    jsonschema.Draft202012Validator(report_schema("report")).validate(json.loads(json.dumps(first.report)))

    recipe = tmp_path / "a.yaml"
    result = api.calibrate(tmp_path / "model.onnx", tmp_path / "data", load_recipe(recipe), tmp_path / "table.json")
    document = json.loads((tmp_path / "table.json").read_text())
    assert document["method_choice"] == result.table.method_choice == first.report["calibration"]["method_choice"]
    scores = document["method_choice"]["worst_output_sqnr_db"]
    assert document["method_choice"]["chosen"] == max(scores, key=lambda name: (scores[name], -list(scores).index(name)))
    for entry in document["tensors"].values():  # each range is the candidate its summary names
        assert [entry["lo"], entry["hi"]] == entry["summary"]["candidates"][entry["summary"]["chosen"]]
    cli = CliRunner().invoke(main, ["calibrate", str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data"),
                                    "--recipe", str(recipe), "--output", str(tmp_path / "again.json")])
    assert cli.exit_code == 0 and "note: calibration.method auto chose " in cli.stderr
    ran = CliRunner().invoke(main, ["quantize", str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data"),
                                    "--recipe", str(recipe), "--no-bench", "--output", str(tmp_path / "q")])
    shown = " ".join(ran.stdout.split())
    assert ran.exit_code in (0, 1) and "note: calibration.method auto chose " in shown  # as README says
    assert "warning: calibration.method auto" not in shown
    assert "- calibration.method auto chose " in (tmp_path / "q" / "report.md").read_text()
