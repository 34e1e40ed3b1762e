"""Every data format feeds the same calibration table on the same samples."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from conftest import ROOT, matmul_chain, save_npy_folder
from qtool import api
from qtool.io.data import DataFolder, InputSpec

SAMPLES = np.random.default_rng(7).standard_t(3, size=(10, 8)).astype(np.float32)
RECIPE = "version: 1\ncalibration: {method: percentile, percentile: 99.9, batch_size: 4}\n"


class Reader(CalibrationDataReader):
    """ONNX Runtime's calibration reader interface, as users write it."""

    def __init__(self):
        self.items = iter([{"x": sample[None]} for sample in SAMPLES])

    def get_next(self):
        return next(self.items, None)


def _stacked_npy(folder):
    np.save(folder / "calib.npy", SAMPLES)
    return folder / "calib.npy"


def _stacked_npz(folder):
    np.savez(folder / "calib.npz", x=SAMPLES)
    return folder / "calib.npz"


def _onnx_test_data(folder):
    for i, sample in enumerate(SAMPLES):
        (folder / f"test_data_set_{i}").mkdir()
        tensor = numpy_helper.from_array(sample[None], "x")
        (folder / f"test_data_set_{i}" / "input_0.pb").write_bytes(tensor.SerializeToString())
    return folder


def _sample_folders(folder):
    for i, sample in enumerate(SAMPLES):
        (folder / f"s{i:03d}").mkdir()
        np.save(folder / f"s{i:03d}" / "x.npy", sample)
    return folder


FORMATS = {
    "stacked .npy": _stacked_npy,
    "stacked .npz": _stacked_npz,
    "test_data_set_*/input_0.pb": _onnx_test_data,
    "per-sample folders": _sample_folders,
    "iterable": lambda folder: [{"x": sample} for sample in SAMPLES],
    "generator": lambda folder: ({"x": sample[None]} for sample in SAMPLES),
    "CalibrationDataReader": lambda folder: Reader(),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The table from a folder of one .npy per sample."""
    folder = tmp_path_factory.mktemp("formats")
    (folder / "model.onnx").write_bytes(matmul_chain(width=8, layers=2).SerializeToString())
    (folder / "recipe.yaml").write_text(RECIPE)
    data = save_npy_folder(folder / "files", SAMPLES)
    document = api.calibrate(folder / "model.onnx", data, folder / "recipe.yaml").document
    assert document["samples"] == len(SAMPLES)
    return folder, document["tensors"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_the_same_table(reference, tmp_path, kind):
    folder, tensors = reference
    data = FORMATS[kind](tmp_path)
    document = api.calibrate(folder / "model.onnx", data, folder / "recipe.yaml").document
    assert document["samples"] == len(SAMPLES)
    if kind in ("generator", "CalibrationDataReader"):
        # Their length is not known beforehand, so range_drift is measured at other points.
        assert _without_drift(document["tensors"]) == _without_drift(tensors)
    else:
        assert document["tensors"] == tensors


def _without_drift(tensors: dict) -> dict:
    return {name: {**entry, "summary": {key: value for key, value in entry["summary"].items()
                                        if not key.startswith("range_drift")}}
            for name, entry in tensors.items()}


def test_a_stacked_file_is_named_as_it_is_in_messages(tmp_path):
    """Five samples in one file: each named by the file, which messages name as it is."""
    np.save(tmp_path / "calib.npy", np.ones((5, 3), np.float32))
    data = DataFolder(tmp_path / "calib.npy", [InputSpec("x", np.dtype(np.float32), ("N", 3))])
    assert data.total == 5 and data.files == ["calib.npy"]
    assert data.where(data.files[0]) == str(tmp_path / "calib.npy")
    assert [batch.files for batch in data.batches(4)] == [("calib.npy",) * 4, ("calib.npy",)]


def test_data_loader_gives_the_same_table(reference, tmp_path):
    folder, tensors = reference
    np.save(tmp_path / "samples.npy", SAMPLES)
    (tmp_path / "loader.py").write_text(
        "import numpy as np\nfrom pathlib import Path\n\n"
        "def feeds():\n"
        "    for row in np.load(Path(__file__).with_name('samples.npy')):\n"
        "        yield {'x': row}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "qtool", "calibrate", str(folder / "model.onnx"), "--recipe", str(folder / "recipe.yaml"),
         "--data-loader", f"{tmp_path / 'loader.py'}:feeds", "--output", str(tmp_path / "table.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "table.json").read_text())
    assert _without_drift(document["tensors"]) == _without_drift(tensors)  # a generator: length unknown
    assert document["data"]["path"] == f"{tmp_path / 'loader.py'}:feeds"


def test_a_data_loader_that_is_not_a_function_is_named(reference, tmp_path):
    folder, _ = reference
    (tmp_path / "loader.py").write_text("feeds = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "qtool", "calibrate", str(folder / "model.onnx"),
         "--data-loader", f"{tmp_path / 'loader.py'}:feeds", "--output", str(tmp_path / "table.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == f"Error: --data-loader {tmp_path / 'loader.py'}:feeds: {tmp_path / 'loader.py'} has no function feeds\n"
    assert not (tmp_path / "table.json").exists()


def test_a_data_loader_that_raises_is_the_data_s_error_naming_it(reference, tmp_path):
    """The user's function raising on its call (before any sample) was exit 3, 'report it'."""
    folder, _ = reference
    (tmp_path / "loader.py").write_text("def feeds():\n    raise ValueError('no data here')\n")
    result = subprocess.run(
        [sys.executable, "-m", "qtool", "calibrate", str(folder / "model.onnx"),
         "--data-loader", f"{tmp_path / 'loader.py'}:feeds", "--output", str(tmp_path / "table.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"Error: {tmp_path / 'loader.py'}:feeds: calling it raised ValueError: no data here\n"
    assert not (tmp_path / "table.json").exists()


def test_an_endless_data_loader_stops_at_the_cap_with_a_note(reference, tmp_path):
    """A generator with no end ran forever without calibration.samples: now the first 256 samples, and a note.
    (This one raises past 2,000 samples, so that the run before the cap failed instead of hanging.)"""
    from click.testing import CliRunner

    from qtool.cli.main import main

    folder, _ = reference
    loader = tmp_path / "loader.py"
    loader.write_text("import numpy as np\n\n"
                      "def feeds():\n"
                      "    rng = np.random.default_rng(0)\n"
                      "    for index in range(2001):\n"
                      "        yield {'x': rng.normal(size=(1, 8)).astype(np.float32)}\n"
                      "    raise RuntimeError('endless: read 2001 samples')\n")
    result = CliRunner().invoke(main, ["calibrate", str(folder / "model.onnx"), "--data-loader", f"{loader}:feeds",
                                       "--output", str(tmp_path / "table.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "table.json").read_text())["samples"] == 256  # qtool.io.feeds.UNSIZED_CAP
    assert (f"note: {loader}:feeds: read its first 256 samples only: it has no len() and gave more (an endless "
            "generator would run forever); set calibration.samples (validation.samples for validation) to read "
            "another count") in result.stderr.splitlines()
