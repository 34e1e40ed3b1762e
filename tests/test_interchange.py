"""Calibration interchange: TensorRT's calibration cache and ONNX Runtime's TensorRT-EP table, both ways."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FUSED, SAMPLE
from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.calibration.table_file import load_table
from qtool.calibration.interchange import load_any_table, trt_cache_text
from qtool.cli.main import main
from qtool.errors import CalibrationError

MODEL, CALIB, EVAL = str(SAMPLE / "model.onnx"), str(SAMPLE / "calib"), str(SAMPLE / "eval")


def spec_scale_hex(amax: float) -> str:
    """The TensorRT cache's arithmetic, spelled independently: float32 scale = amax / 127, big-endian bits."""
    return np.array([amax / 127.0], dtype=">f4").tobytes().hex()


def test_trt_cache_follows_the_spec_both_ways(tmp_path):
    table = CalibrationTable({"conv:0": TensorRange(-3.0, 2.5, "minmax"), "relu": TensorRange(0.0, 6.35, "minmax")}, 8)
    text = trt_cache_text(table)
    assert text.splitlines() == ["TRT-8601-EntropyCalibration2", f"conv:0: {spec_scale_hex(3.0)}",
                                 f"relu: {spec_scale_hex(6.35)}"]
    assert spec_scale_hex(6.35) == "3d4ccccd"  # 0.05 as float32
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-8501-EntropyCalibration2\nrelu: 3d4ccccd\nout: 3c010204\n\n")
    ranges = load_any_table(cache).ranges
    for name, hex_ in (("relu", "3d4ccccd"), ("out", "3c010204")):
        amax = struct.unpack(">f", bytes.fromhex(hex_))[0] * 127
        assert (ranges[name].lo, ranges[name].hi) == (-amax, amax)
    assert ranges["relu"].hi == pytest.approx(6.35, rel=1e-7)


def test_ort_table_as_onnxruntime_writes_it_is_read_exactly(tmp_path):
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    los, his = np.float32([-1.5, 0.0]), np.float32([2.25, 0.1])
    write_calibration_table({"a": TensorData(lowest=los[0], highest=his[0]),
                             "b": TensorData(lowest=los[1], highest=his[1])}, str(tmp_path))
    exact = load_any_table(tmp_path)  # the folder: calibration.json first
    assert {n: (r.lo, r.hi) for n, r in exact.ranges.items()} == {"a": (-1.5, 2.25), "b": (0.0, float(his[1]))}
    for name in ("calibration.cache", "calibration.flatbuffers"):  # one number each: max(highest, lowest)
        ranges = load_any_table(tmp_path / name).ranges
        assert {n: (r.lo, r.hi) for n, r in ranges.items()} == {"a": (-2.25, 2.25), "b": (-float(his[1]), float(his[1]))}
    # an older onnxruntime's calibration.json: [lowest, highest] pairs
    (tmp_path / "old.json").write_text(json.dumps({"a": [-1.0, 3.0]}))
    old = load_any_table(tmp_path / "old.json").ranges["a"]
    assert (old.lo, old.hi) == (-1.0, 3.0)


@pytest.mark.parametrize("text, message", [
    ("TRT-8601-EntropyCalibration2\nrelu: 3d4cc\n", "calib.cache:2: expected `tensor: <8 hex digits"),
    ("TRT-8601-EntropyCalibration2\nrelu: zzzzzzzz\n", "calib.cache:2: expected `tensor: <8 hex digits"),
    ("relu 0.5\nconv nan\n", "calib.cache:2: expected `tensor value`"),
    ('{"a": {"lowest": 2, "highest": 1}}', "calib.cache: a: lowest 2 is above highest 1"),
    ("TRT-8601-EntropyCalibration2\n", "calib.cache: trt-cache holds no tensor ranges"),
])
def test_bad_foreign_tables_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "calib.cache"
    path.write_text(text)
    with pytest.raises(CalibrationError) as info:
        load_any_table(path)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    runner = CliRunner()
    for fmt, name in (("qtool", "table.json"), ("trt-cache", "trt.cache"), ("ort-table", "ort")):
        result = runner.invoke(main, ["calibrate", MODEL, "--data", CALIB, "--output", str(folder / name),
                                      "--format", fmt, "--quiet"])
        assert result.exit_code == 0, result.output
    return folder


def test_calibrate_exports_round_trip(exported):
    table = load_table(exported / "table.json")
    trt = load_any_table(exported / "trt.cache")
    ort = load_any_table(exported / "ort")
    assert set(trt.ranges) == set(ort.ranges) == set(table.ranges)
    for name, r in table.ranges.items():
        amax = max(abs(r.lo), abs(r.hi))
        assert trt.ranges[name].hi == pytest.approx(amax, rel=2**-23) and trt.ranges[name].lo == -trt.ranges[name].hi
        assert (ort.ranges[name].lo, ort.ranges[name].hi) == (float(np.float32(r.lo)), float(np.float32(r.hi)))
    assert sorted(p.name for p in (exported / "ort").iterdir()) == [
        "calibration.cache", "calibration.flatbuffers", "calibration.json"]


def test_quantize_reads_every_format(exported, tmp_path):
    """`placement: fused`: with a TensorRT table's symmetric int8 ranges, ORT runs digits_cnn's MaxPools as NCHW
    int8 loops and `fast` keeps the model float (it would refuse), which is not what this test is about."""
    runner, models = CliRunner(), {}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(FUSED)
    for name in ("table.json", "trt.cache", "ort", "ort/calibration.flatbuffers"):
        output = tmp_path / name.replace("/", "-")
        result = runner.invoke(main, ["quantize", MODEL, "--calibration", str(exported / name), "--recipe", str(recipe),
                                      "--validation-data", EVAL, "--output", str(output), "--quiet"])
        assert result.exit_code == 0, result.output
        models[name] = (output / "model.onnx").read_bytes()
        report = json.loads((output / "report.json").read_text())
        assert report["validation"]["accuracy"]["drop"] <= 0.01
        imported = [w for w in report["warnings"] if "imported from" in w]
        assert bool(imported) == (name != "table.json")
    # ORT's JSON keeps lowest and highest: the same min/max ranges, the same model, byte for byte
    assert models["ort"] == models["table.json"]
    assert models["trt.cache"] != models["table.json"]  # symmetric ranges: a different model


def test_ort_table_output_is_a_folder_that_needs_overwrite(exported):
    result = CliRunner().invoke(main, ["calibrate", MODEL, "--data", CALIB, "--output", str(exported / "ort"),
                                       "--format", "ort-table", "--quiet"])
    assert result.exit_code == 2 and "pass --overwrite" in result.output
