"""Data errors name the real cause: ORT's whole message, the model when it is the model, the file when it is the file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from onnx import TensorProto, helper
from PIL import Image

from conftest import ROOT, make_model, matmul_chain, save_npy_folder, with_fused_recipe
from qtool.io.data import DataFolder, InputSpec
from qtool.recipe.inputs import ImageSpec


def qtool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *with_fused_recipe(list(map(str, args)))], capture_output=True,
                          text=True, cwd=ROOT)


def _quantize(tmp_path, model, data, *extra) -> subprocess.CompletedProcess:
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    return qtool("quantize", tmp_path / "model.onnx", "--data", data, "--output", tmp_path / "out", *extra)


def test_a_model_side_failure_keeps_orts_whole_message_and_blames_no_file(tmp_path):
    """x [N, C] (C symbolic) fits any width; the MatMul inside needs 8: ONNX Runtime fails in a node."""
    weight = np.ones((8, 2), np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], {"w": weight})
    data = save_npy_folder(tmp_path / "calib", np.ones((3, 1, 4)))
    result = _quantize(tmp_path, model, data)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("Error: ONNX Runtime failed running the model (on ")
    assert "not a readable" not in line and "refused this input" not in line
    assert "MatMul" in line and "Status Message:" in line  # ORT's text after its first line is kept
    assert not (tmp_path / "out").exists()


def test_a_model_without_inputs_says_so(tmp_path):
    model = make_model([helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [2],
                                                                                          [1.0, 2.0]))],
                       [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    data = save_npy_folder(tmp_path / "calib", np.ones((2, 2)))
    result = _quantize(tmp_path, model, data)
    assert result.returncode == 2
    assert result.stderr == (f"Error: {tmp_path / 'model.onnx'}: the model has no inputs (every value is computed "
                             "inside it): there is nothing for calibration data to feed\n")


def test_a_file_that_is_not_npy_gets_no_allow_pickle_advice(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "000.npy").write_text("0.1, 0.2, 0.3\n")
    result = _quantize(tmp_path, matmul_chain(), calib)
    assert result.returncode == 2
    assert "allow_pickle" not in result.stderr
    assert result.stderr == (f"Error: {calib / '000.npy'}: not a .npy file: it does not start with the .npy "
                             "signature \\x93NUMPY (it starts with b'0.1, 0')\n")


def test_sixteen_bit_images_are_scaled_by_their_range_not_clipped(tmp_path):
    pixels = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(pixels).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    data = DataFolder(tmp_path, [InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))], images=ImageSpec(size=(8, 8)))
    (_, feeds), = list(data.samples())
    got = feeds["x"][0]
    assert np.allclose(got[0], pixels / 65535, atol=1e-6)  # scale 255 after 0..65535 -> 0..255
    assert np.array_equal(got[0], got[2])
    assert np.mean(got >= got.max()) < 0.05  # clipping at 255 made 98 % of these pixels equal


def test_nan_in_validation_data_is_a_data_error_naming_the_file(tmp_path):
    calib = save_npy_folder(tmp_path / "calib", np.random.default_rng(0).normal(size=(4, 1, 8)))
    values = np.random.default_rng(1).normal(size=(3, 1, 8))
    values[1, 0, 3] = np.nan
    evaluation = save_npy_folder(tmp_path / "eval", values)
    result = _quantize(tmp_path, matmul_chain(), calib, "--validation-data", evaluation)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"Error: {evaluation / '0001.npy'}: input x holds NaN or Inf "
                                              "values; data must be finite numbers")
    assert not (tmp_path / "out").exists()


def test_a_missing_validation_folder_named_by_the_recipe_names_the_recipe_and_key(tmp_path):
    """New-user finding: `validation.data: evl` said only `Error: /abs/evl: no such data folder or file`,
    a path the user never typed on the command line."""
    data = save_npy_folder(tmp_path / "calib", np.ones((3, 1, 8)))
    (tmp_path / "r.yaml").write_text("version: 1\nvalidation:\n  data: evl\n")
    result = _quantize(tmp_path, matmul_chain(), data, "--recipe", tmp_path / "r.yaml")
    assert result.returncode == 2
    assert result.stderr == (f"Error: {tmp_path / 'r.yaml'}: validation.data: no such data folder or file "
                             f"{tmp_path / 'evl'}\n")
