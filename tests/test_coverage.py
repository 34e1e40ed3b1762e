"""A run that quantizes nothing, or loses most of it to unusable ranges, is refused (exit 2, nothing
written); a node left with no quantized tensor is counted float, never "quantized"."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import ROOT, make_model, save_npy_folder, fused_recipe
from qtool import api
from qtool.cli.main import main
from qtool.errors import CalibrationError, DataError, ModelError
from qtool.recipe.load import load_recipe


def gemm_only(seed: int = 0):
    """x [N, 16] -> Gemm -> Relu -> Gemm: nothing for a MatMul recipe to take."""
    rng = np.random.default_rng(seed)
    return make_model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"w1": rng.normal(size=(8, 16)).astype(np.float32), "b1": np.zeros(8, np.float32),
         "w2": rng.normal(size=(4, 8)).astype(np.float32), "b2": np.zeros(4, np.float32)})


@pytest.fixture
def gemm(tmp_path):
    path = tmp_path / "gemm.onnx"
    path.write_bytes(gemm_only().SerializeToString())
    return path, save_npy_folder(tmp_path / "data", np.random.default_rng(1).normal(size=(8, 1, 16)))


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_w4_matmul_on_a_gemm_only_model_exits_2_saying_nothing_is_quantized(gemm, tmp_path):
    model, data = gemm
    result = run("quantize", str(model), "--recipe", str(ROOT / "qtool" / "recipe" / "presets" / "w4-matmul.yaml"), "--data", str(data),
                 "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "nothing to quantize: none of its 3 nodes under recipe" in result.stderr
    assert "Gemm×2, Relu×1: quantization.static is false" in result.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_files_of_zero_samples_exit_2(gemm, tmp_path):
    model, data = gemm
    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "a.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(DataError, match="no samples to calibrate with"):
        api.quantize(model, empty, validation_data=data)


def test_validation_files_of_zero_samples_exit_2(gemm, tmp_path):
    model, data = gemm
    empty = tmp_path / "empty"
    empty.mkdir()
    np.save(empty / "a.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(DataError, match="no samples to validate with"):
        api.quantize(model, data, fused_recipe(), validation_data=empty)


def test_a_table_of_degenerate_ranges_exits_2_naming_it(gemm, tmp_path):
    model, data = gemm
    table = tmp_path / "table.json"
    api.calibrate(model, data, None, table)
    document = json.loads(table.read_text())
    for entry, (lo, hi) in zip(document["tensors"].values(), [(0.5, 0.5), (-1e38, 1e38), (-1e-45, 1e-45)]):
        entry["lo"], entry["hi"] = lo, hi
    table.write_text(json.dumps(document))
    result = run("quantize", str(model), "--calibration", str(table), "--validation-data", str(data),
                 "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {table}: no usable range for 3 of the 3 nodes") or \
        f"{table}: no usable range for 3 of the 3 nodes" in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(CalibrationError):
        api.quantize(model, None, calibration=table, validation_data=data)


def test_a_node_whose_every_range_is_degenerate_counts_as_float(tmp_path):
    """x -> Mul(x, 0) -> Sigmoid (always 0.5): the Sigmoid has nothing to quantize; the Conv has."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["x", "zero"], ["z"], name="mask"),
         helper.make_node("Sigmoid", ["z"], ["half"], name="gate"),
         helper.make_node("Add", ["c", "half"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        {"w": rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "zero": np.zeros((1, 4, 1, 1), np.float32)},
        opset=13)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", rng.normal(size=(8, 1, 4, 8, 8)))
    # placement all: under fused, the Add beside the float Sigmoid stays float for speed, not for its range
    (tmp_path / "recipe.yaml").write_text("version: 1\nquantization: {placement: all}\n")
    result = api.quantize(path, data, load_recipe(tmp_path / "recipe.yaml"))
    nodes = {node["node"]: node for node in result.report["plan"]["nodes"]}
    assert not nodes["gate"]["quantized"] and nodes["gate"]["reason"].startswith("float: no usable range for z")
    assert nodes["conv"]["quantized"] and nodes["add"]["quantized"]
    assert result.report["plan"]["nodes_quantized"] == sum(node["quantized"] for node in nodes.values()) == 3
    assert any(w.startswith("1 of the 4 nodes the plan quantizes kept float (3 of the model's 4 nodes quantized): "
                            "no usable range") for w in result.report["warnings"])
    # Finding 15: under placement fused the Add beside the float Sigmoid stays float too; the warning counted
    # the recipe's 4 nodes while the plan said 2 of 4 quantized: it counts the plan's, as the summary does.
    fused = api.quantize(path, data, fused_recipe())
    quantized = fused.report["plan"]["nodes_quantized"]
    assert quantized < 3 and (f"1 of the {quantized + 1} nodes the plan quantizes kept float ({quantized} of the "
                              "model's 4 nodes quantized)") in " ".join(fused.report["warnings"])
    assert not any(node.op_type == "QuantizeLinear" and node.input[0] in ("z", "half") for node in result.model.graph.node)


def test_an_unquantizable_model_is_refused_by_the_api_too(gemm):
    model, data = gemm
    with pytest.raises(ModelError, match="nothing to quantize"):
        api.quantize(model, data, ROOT / "qtool" / "recipe" / "presets" / "w4-matmul.yaml")


def test_a_model_whose_only_node_is_a_split_concat_is_refused_as_nothing_to_quantize(tmp_path):
    model = make_model([helper.make_node("Concat", ["a", "b"], ["y"], name="join", axis=1)],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(data / f"{i}.npz", a=(rng.random((1, 4)) * 650).astype(np.float32),
                 b=rng.random((1, 4)).astype(np.float32))
    with pytest.raises(ModelError, match=r"nothing to quantize: none of its 1 nodes .*Concat×1: kept float"):
        api.quantize(path, data)
