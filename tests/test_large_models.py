"""Models past protobuf's 2 GB limit, simulated: the limit is lowered so a small model takes every large-model path.

Input with external data → load (weights kept on disk, checker by path) → calibrate (ORT
session over a file beside the weights) → quantize (new weights streamed to disk, checker by
path) → save with external data inside the output folder. bench/large_model.py runs the real
> 2 GB case; test_large_model_memory.py bounds the peak memory.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from conftest import matmul_chain, save_npy_folder
from qtool import api
from qtool.errors import ModelError
from qtool.quantization import prepare


def lower_limit(monkeypatch) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("qtool") and hasattr(module, "PROTOBUF_LIMIT"):
            monkeypatch.setattr(module, "PROTOBUF_LIMIT", 16 << 10)


@pytest.fixture
def small_limit(monkeypatch):
    """Every qtool module that compares against PROTOBUF_LIMIT sees 16 KiB instead of 2 GiB."""
    lower_limit(monkeypatch)


def test_large_model_is_quantized_exactly_like_its_small_twin(tmp_path, monkeypatch):
    """Shape inference was skipped past the limit: intermediates had no type, every Relu stayed
    float ("no float inputs to quantize") and 2 of 4 activations went unquantized."""
    float_model = matmul_chain(64, 3)
    onnx.save_model(float_model, str(tmp_path / "twin.onnx"))
    (tmp_path / "large").mkdir()
    onnx.save_model(float_model, str(tmp_path / "large" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    data = save_npy_folder(tmp_path / "data", [np.random.RandomState(1).randn(1, 64) for _ in range(8)])
    twin = api.quantize(tmp_path / "twin.onnx", data)
    lower_limit(monkeypatch)
    monkeypatch.setattr(prepare, "SKELETON_BYTES", 1 << 10)  # shape inference sees weights by type and dims only
    large = api.quantize(tmp_path / "large" / "model.onnx", data)
    assert twin.report["plan"]["nodes_quantized"] == large.report["plan"]["nodes_quantized"] == 6
    assert twin.report["plan"]["nodes"] == large.report["plan"]["nodes"]
    assert twin.model.graph.node == large.model.graph.node
    assert {t.name: t for t in twin.model.graph.initializer} == {t.name: t for t in large.model.graph.initializer}


def test_external_data_model_through_the_large_model_path(tmp_path, small_limit):
    source = tmp_path / "in"
    source.mkdir()
    float_model = matmul_chain(64, 3)
    onnx.save_model(float_model, str(source / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (source / "weights.bin").stat().st_size > 3 * 64 * 64 * 4 - 1
    rng = np.random.RandomState(1)
    data = save_npy_folder(tmp_path / "data", [rng.randn(1, 64) for _ in range(8)])
    output = tmp_path / "out"

    result = api.quantize(source / "model.onnx", data, None, output)

    files = sorted(p.name for p in output.iterdir())
    assert "model.onnx" in files and "model.onnx.data" in files
    header = onnx.load(str(output / "model.onnx"), load_external_data=False)
    locations = {entry.value for tensor in header.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    assert locations == {"model.onnx.data"}  # inside the output folder, relative
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    x = rng.randn(4, 64).astype(np.float32)
    reference = ort.InferenceSession(str(source / "model.onnx"), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    # Saving with external data must not strip the weights from the model the api returns.
    assert all(t.data_location == TensorProto.DEFAULT for t in result.model.graph.initializer)
    assert result.report["calibration"]["samples"] == 8


def test_large_model_whose_external_data_is_short_is_refused(tmp_path, small_limit):
    """Past the limit the data stays on disk: its bounds are checked at load, as onnx's loader does."""
    float_model = matmul_chain(64, 3)
    onnx.save_model(float_model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    with open(tmp_path / "weights.bin", "r+b") as handle:
        handle.truncate(2 * 64 * 64 * 4 + 10)
    with pytest.raises(ModelError, match=r"cannot read external data: External data length \(16384\) exceeds "
                                         r"available data \(10 bytes from offset 32768\) for tensor 'w2'"):
        api.quantize(tmp_path / "model.onnx", tmp_path)
