"""tune, sensitivity and compare past protobuf's 2 GB limit, and the work files such a model needs.

As in test_large_models.py, the limit is lowered (16 KiB) so that a small model takes every
large-model path; each result is checked against its small twin's. The digest that says whether
`quantize` reproduced tune's choice is checked on a real > 2 GB model (sparse files: no disk
written). The work folder (qtool.io.external) must be gone when a use case returns, and when a run is
interrupted (SIGINT, SIGTERM) in a child process paused right after it copied the input's weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import fused_recipe, save_npy_folder
from test_large_models import lower_limit
from test_tune import HOSTILE, hostile_model
from qtool import api
from qtool.io import external
from qtool.io.model import load_model
from qtool.quantization import prepare
from qtool.search import api as search_api

WIDTH = 64  # 6 weights of 16 KiB: past the lowered limit
LIMIT_CHILD = """
import sys, time
import qtool.cli.main
from qtool.io import external
for name, module in list(sys.modules.items()):
    if name.startswith("qtool") and hasattr(module, "PROTOBUF_LIMIT"):
        module.PROTOBUF_LIMIT = 16 << 10
copy = external._work_copy
def paused(source):  # the input's weights are in the work folder now: the parent interrupts us here
    made = copy(source)
    print("copied", flush=True)
    time.sleep(120)
    return made
external._work_copy = paused
sys.argv = ["qtool", *sys.argv[1:]]
qtool.cli.main.main()
"""


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The hostile MatMul chain twice: one file (twin), and its weights as external data (large)."""
    folder = tmp_path_factory.mktemp("twins")
    model = hostile_model(width=WIDTH)
    (folder / "twin").mkdir()
    (folder / "large").mkdir()
    onnx.save_model(model, str(folder / "twin" / "model.onnx"))
    onnx.save_model(model, str(folder / "large" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    rng = np.random.default_rng(1)
    save_npy_folder(folder / "calib", [rng.standard_normal((1, WIDTH)) for _ in range(16)])
    save_npy_folder(folder / "eval", [rng.standard_normal((1, WIDTH)) for _ in range(16)])
    (folder / "recipe.yaml").write_text("version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_sqnr_db: 12}\n")
    return folder


@pytest.fixture
def scratch_dir(tmp_path, monkeypatch):
    """TMPDIR for this test: what qtool leaves in the temporary folder is seen."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def large_paths(monkeypatch) -> None:
    lower_limit(monkeypatch)
    monkeypatch.setattr(prepare, "SKELETON_BYTES", 1 << 10)  # shape inference sees weights by type and dims


def test_tune_past_the_limit_is_reproduced_by_quantize_as_its_twin_is(twins, tmp_path, monkeypatch, scratch_dir):
    """The trial's digest named its spill files' temporary paths, so `reproduced_by_quantize` was False;
    and every best-so-far model past the limit left its data file under a staging name."""
    def tune(kind: str):
        return search_api.tune(twins / kind / "model.onnx", twins / "calib", twins / "recipe.yaml", tmp_path / kind,
                               validation_data=twins / "eval", max_trials=6, latency_runs=0)

    twin = tune("twin")
    large_paths(monkeypatch)
    large = tune("large")
    for result in (twin, large):
        assert [p["node"] for p in result.report["chosen"]["promotions"]] == [HOSTILE]
        assert result.report["chosen"]["reproduced_by_quantize"] is True
    assert large.report["chosen"]["model_sha256"] == twin.report["chosen"]["model_sha256"]
    assert sorted(p.name for p in (tmp_path / "large").iterdir()) == [
        "model.onnx", "model.onnx.data", "recipe.tuned.yaml", "report.html", "report.json", "report.md",
        "sensitivity.cache.json"]
    written = load_model(tmp_path / "large" / "model.onnx", allow_quantized=True)
    assert external.content_sha256(written) == large.report["chosen"]["model_sha256"]
    x = np.random.default_rng(2).standard_normal((4, WIDTH)).astype(np.float32)
    got = [ort.InferenceSession(str(tmp_path / kind / "model.onnx")).run(None, {"x": x})[0]
           for kind in ("twin", "large")]
    assert np.array_equal(*got)
    assert list(scratch_dir.iterdir()) == []  # the trials' folder and qtool's work folder are gone


def test_sensitivity_and_compare_past_the_limit_give_the_twin_s_figures(twins, tmp_path, monkeypatch, scratch_dir):
    def run(kind: str):
        ranking = search_api.sensitivity(twins / kind / "model.onnx", twins / "calib", twins / "recipe.yaml",
                                         validation_data=twins / "eval").rows
        quantized = api.quantize(twins / kind / "model.onnx", twins / "calib", fused_recipe(), tmp_path / kind)
        compared = api.compare(twins / kind / "model.onnx", tmp_path / kind / "model.onnx", twins / "eval")
        # size_bytes: past the limit an upper bound (proto_size counts each on-disk tensor's file location)
        return [{k: v for k, v in row.items() if k not in ("seconds", "size_bytes")} for row in ranking], \
            quantized, compared

    twin_rows, twin_quantized, twin_compare = run("twin")
    large_paths(monkeypatch)
    rows, quantized, compared = run("large")
    assert rows == twin_rows and rows[0]["node"] == HOSTILE
    assert (tmp_path / "large" / "model.onnx.data").is_file()  # the candidate compare read is past the limit too
    assert compared.report["validation"] == twin_compare.report["validation"]
    assert quantized.report["validation"] == twin_quantized.report["validation"]
    assert quantized.report["plan"] == twin_quantized.report["plan"]
    assert list(scratch_dir.iterdir()) == []  # no work folder outlives quantize, compare or sensitivity


def test_the_model_digest_names_weights_not_where_they_are_kept_on_a_real_large_model(tmp_path):
    """Two > 2 GB models, the same weights in files at different paths: one digest, though their
    headers (which name those paths) differ. ~2 x 4 s of hashing."""
    if shutil.disk_usage(tmp_path).free < 5 << 30:  # sparse where the file system allows; else written
        pytest.skip("needs ~4.5 GB of free disk where the file system has no sparse files")
    elements = (1 << 29) + 256  # float32: just past 2 GiB
    digests, headers = [], []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "weights.bin", "wb") as handle:
            handle.truncate(elements * 4 - 4)  # zeros, not written
            handle.seek(elements * 4 - 4)
            handle.write(np.float32(1.5).tobytes())
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[elements])
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(elements * 4))):
            weight.external_data.add(key=key, value=value)
        graph = helper.make_graph([helper.make_node("Gather", ["w", "i"], ["y"])], "large",
                                  [helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [weight])
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(folder / "m.onnx"))
        model = load_model(folder / "m.onnx")  # past the limit: kept on disk, located by absolute path
        headers.append(model.SerializeToString())
        digests.append(external.content_sha256(model))
    assert headers[0] != headers[1] and digests[0] == digests[1]


def test_the_model_digest_follows_every_weight_byte_and_name(tmp_path):
    model = hostile_model(width=WIDTH)
    digest = external.content_sha256(model)
    with external.scratch(tmp_path):
        spilled = onnx.ModelProto()
        spilled.CopyFrom(model)
        external.spill(spilled)
        assert all(t.data_location == TensorProto.EXTERNAL for t in spilled.graph.initializer if t.name[0] == "w")
        assert external.content_sha256(spilled) == digest
        data = next(tmp_path.glob("spill-*.data"))
        with open(data, "r+b") as handle:
            handle.seek(100)
            byte = handle.read(1)
            handle.seek(100)
            handle.write(bytes([byte[0] ^ 1]))
        assert external.content_sha256(spilled) != digest
    assert list(tmp_path.iterdir()) == []  # the spill file went with the block
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].name = "other"
    assert external.content_sha256(renamed) != digest


@pytest.mark.parametrize("command,signum,code", [("quantize", signal.SIGINT, 130), ("tune", signal.SIGTERM, 143)])
def test_an_interrupted_run_leaves_no_copy_of_the_weights(twins, tmp_path, command, signum, code):
    """The child stops right after copying the input's weights into its work folder (for its first
    ONNX Runtime session); Ctrl-C or SIGTERM then must remove the copy and the folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = [command, str(twins / "large" / "model.onnx"), "--data", str(twins / "calib"), "--output",
            str(tmp_path / "out")] + (["--recipe", str(twins / "recipe.yaml")] if command == "tune" else [])
    child = subprocess.Popen([sys.executable, "-c", LIMIT_CHILD, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        assert child.stdout.readline().strip() == "copied", child.stderr.read()
        copies = [path for path in scratch.rglob("input-*.data")]
        assert len(copies) == 1 and copies[0].stat().st_size > 6 * WIDTH * WIDTH * 4
        child.send_signal(signum)
        assert child.wait(timeout=60) == code, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert [path.name for path in scratch.iterdir() if path.name.startswith("qtool-")] == []
    assert not (tmp_path / "out").exists()
