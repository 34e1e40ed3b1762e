"""Bad and hostile input: one clear line and exit 2, nothing written, nothing read or run that should not be.

Covers the error path (exit 2 / 3, --debug), atomic outputs under failure and
signals, and each hostile input class listed in docs/hostile-inputs.md.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLE, fused_recipe, make_model, matmul_chain, save_npy_folder, with_fused_recipe
from qtool import api
from qtool.cli.main import main
from qtool.errors import DataError, ModelError, WriteError
from qtool.io import artifacts
from qtool.io.data import DataFolder, InputSpec, fit_to_input, model_inputs
from qtool.io.model import load_model
from qtool.reporting.markdown import md_escape


def qtool(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *with_fused_recipe(list(args))], capture_output=True, text=True, cwd=ROOT,
                          **kwargs)


def quantize_args(model, data, output, *extra) -> list[str]:
    return with_fused_recipe(["quantize", str(model), "--data", str(data), "--output", str(output), *extra])


def leftovers(folder: Path) -> list[str]:
    """Temporary folders write_artifacts would leave beside an output if cleanup failed."""
    return sorted(path.name for path in folder.glob("*.qtool-tmp"))


@pytest.fixture
def small(tmp_path):
    """A one-MatMul model and 16 samples: (model path, data folder)."""
    model = tmp_path / "model.onnx"
    onnx.save(matmul_chain(), str(model))
    rng = np.random.RandomState(1)
    data = save_npy_folder(tmp_path / "data", [rng.randn(1, 8) for _ in range(16)])
    return model, data


# --- one error path -------------------------------------------------------------------------


def test_internal_error_exits_3_with_one_line_pointing_to_debug(small, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("invariant broken\nsecond line")

    monkeypatch.setattr(api, "quantize", broken)
    model, data = small
    result = CliRunner().invoke(main, quantize_args(model, data, tmp_path / "out"))
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        "Internal error (RuntimeError: invariant broken); run again as `qtool --debug COMMAND ...` for the traceback "
        "and report it."
    ]
    debug = CliRunner().invoke(main, ["--debug", *quantize_args(model, data, tmp_path / "out")])
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "invariant broken" in debug.stderr


def test_user_error_exits_2_on_one_line_without_traceback(small, tmp_path, monkeypatch):
    def refuses(*args, **kwargs):
        raise ModelError("m.onnx: node 'conv': something\nthe library's second line")

    monkeypatch.setattr(api, "quantize", refuses)
    model, data = small
    result = CliRunner().invoke(main, quantize_args(model, data, tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr == "Error: m.onnx: node 'conv': something the library's second line\n"
    debug = CliRunner().invoke(main, ["--debug", *quantize_args(model, data, tmp_path / "out")])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


def test_click_usage_errors_exit_2():
    result = CliRunner().invoke(main, ["quantize", "model.onnx"])
    assert result.exit_code == 2 and "Error: Missing option" in result.stderr
    assert CliRunner().invoke(main, ["quantise"]).exit_code == 2


# --- atomic outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), SystemExit(143)])
def test_failed_write_leaves_nothing(tmp_path, failure):
    def second_fails(path: Path):
        raise failure

    output = tmp_path / "out"
    writers = {"model.onnx": lambda path: path.write_bytes(b"x" * 1000), "report.json": second_fails}
    with pytest.raises((type(failure), WriteError)):
        artifacts.write_artifacts(output, False, writers)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")

    def fails(path: Path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.write_artifacts(output, True, {"model.onnx": fails})
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (output / "old.txt").read_text() == "old"
    artifacts.write_artifacts(output, True, {"model.onnx": lambda path: path.write_text("new")})
    assert [p.name for p in output.iterdir()] == ["model.onnx"] and leftovers(tmp_path) == []


def test_existing_output_refused_without_overwrite(small, tmp_path):
    model, data = small
    output = tmp_path / "out"
    assert CliRunner().invoke(main, quantize_args(model, data, output, "-q")).exit_code == 0
    (output / "keep.txt").write_text("mine")  # an earlier run's folder, a file of the user's added
    result = CliRunner().invoke(main, quantize_args(model, data, output))
    assert result.exit_code == 2
    assert result.stderr == f"Error: {output}: output folder exists; pass --overwrite to replace it\n"
    assert (output / "keep.txt").read_text() == "mine"
    assert CliRunner().invoke(main, quantize_args(model, data, output, "--overwrite", "-q")).exit_code == 0
    names = {p.name for p in output.iterdir()}
    assert {"model.onnx", "report.json", "report.md"} <= names and "keep.txt" not in names


@pytest.mark.parametrize("target", ["model", "model_folder", "data"])
def test_output_may_not_be_or_contain_an_input(small, target):
    model, data = small
    output = {"model": model, "model_folder": model.parent, "data": data}[target]
    before = sorted(p.relative_to(model.parent) for p in model.parent.rglob("*"))
    result = CliRunner().invoke(main, quantize_args(model, data, output, "--overwrite"))
    assert result.exit_code == 2 and "output folder would contain the input" in result.stderr
    assert sorted(p.relative_to(model.parent) for p in model.parent.rglob("*")) == before


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory):
    """A model and 800 one-sample files: calibration with batch_size 1 takes seconds."""
    folder = tmp_path_factory.mktemp("slow")
    onnx.save(matmul_chain(width=512, layers=8), str(folder / "model.onnx"))
    rng = np.random.RandomState(2)
    save_npy_folder(folder / "data", [rng.randn(1, 512) for _ in range(800)])
    (folder / "recipe.yaml").write_text("version: 1\ncalibration: {method: minmax, batch_size: 1}\n")
    return folder


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_calibration_leaves_nothing(slow_job, tmp_path, signum, code):
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "qtool", "quantize", str(slow_job / "model.onnx"), "--recipe",
         str(slow_job / "recipe.yaml"), "--data", str(slow_job / "data"), "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    started = time.monotonic()
    for line in process.stderr:  # the first progress line comes after the first calibration batch
        lines.append(line)
        if line.startswith("calibrate:") or time.monotonic() - started > 60:
            break
    assert any(line.startswith("calibrate:") for line in lines), lines
    assert "calibrate: 800/800" not in "".join(lines), "calibration finished before the signal"
    process.send_signal(signum)
    try:
        _, rest = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == code, "".join(lines) + rest
    assert rest.strip().splitlines()[-1] in ("Interrupted: nothing was written.", "Terminated: nothing was written.")
    assert "Traceback" not in rest
    assert not output.exists() and list(tmp_path.iterdir()) == []


# --- hostile models -------------------------------------------------------------------------


def external_model(folder: Path, location: str) -> Path:
    """A model whose weight lives in external data at `location` (written as given, not checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = matmul_chain()
    weight = model.graph.initializer[0]
    raw = numpy_helper.to_array(weight).tobytes()
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(len(raw))}.items():
        weight.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    path = external_model(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").write_bytes(np.ones((8, 8), np.float32).tobytes())
    assert numpy_helper.to_array(load_model(path).graph.initializer[0]).sum() == 64


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_escaping_the_model_folder_is_refused(tmp_path, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full((8, 8), 7, np.float32).tobytes())
    location = {"absolute": str(secret), "dotdot": "../secret.bin", "symlink": "link.bin"}[kind]
    path = external_model(tmp_path / "m", location)
    if kind == "symlink":
        (tmp_path / "m" / "link.bin").symlink_to(secret)
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: external data location {location!r} points outside the model's folder; "
        f"only relative paths inside {path.parent.resolve()} are allowed"
    )
    result = CliRunner().invoke(main, quantize_args(path, SAMPLE / "calib", tmp_path / "out"))
    assert result.exit_code == 2 and "points outside the model's folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_external_data_location_with_a_nul_byte_is_refused(tmp_path):
    """Path calls raise ValueError on a NUL: it was exit 3 (quantize) and a crash in inspect."""
    location = "weights.bin\0../../etc/passwd"
    path = external_model(tmp_path / "m", location)
    (tmp_path / "m" / "weights.bin").write_bytes(b"\0" * 256)
    result = CliRunner().invoke(main, quantize_args(path, SAMPLE / "calib", tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {path}: external data location {location!r} holds a NUL byte; "
                             "only plain relative file names are allowed\n")
    assert not (tmp_path / "out").exists()
    facts = api.inspect(path)
    assert [p.action for p in facts.problems] == ["refuse"] and "holds a NUL byte" in facts.problems[0].message


def gather_model() -> onnx.ModelProto:
    """ids int64 [N, 4] → Gather from a [10, 8] table → MatMul → Relu: ids must lie in [-10, 9]."""
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"], name="relu")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        {"table": rng.normal(size=(10, 8)).astype(np.float32), "w": rng.normal(size=(8, 8)).astype(np.float32)},
    )


@pytest.mark.parametrize("where", ["validation", "calibration", "compare"])
def test_input_onnx_runtime_rejects_at_run_time_names_the_file(tmp_path, where):
    """A Gather index out of range in the 6th of 8 files (one batch): exit 2 naming that file and ORT's
    reason; validation and compare were exit 3 with a raw InvalidArgument."""
    model = tmp_path / "model.onnx"
    onnx.save(gather_model(), model)
    rng = np.random.default_rng(1)
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        for i in range(8):
            np.save(folder / f"{i:04d}.npy", rng.integers(0, 10, size=(1, 4)) + (40 if folder == bad and i == 5 else 0))
    if where == "compare":
        api.quantize(model, good, fused_recipe(), output_dir=tmp_path / "q")
        args = ["compare", str(model), str(tmp_path / "q" / "model.onnx"), "--data", str(bad),
                "--output", str(tmp_path / "out")]
    else:
        args = quantize_args(model, bad if where == "calibration" else good, tmp_path / "out",
                             *(["--validation-data", str(bad)] if where == "validation" else []))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    which = "the float model" if where == "calibration" else "the reference model"
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert error.startswith(f"Error: {bad / '0005.npy'}: ONNX Runtime failed to run {which} on this input: ")
    assert "indices element out of data bounds, idx=4" in error
    assert not (tmp_path / "out").exists()


def test_compare_with_a_model_onnx_runtime_cannot_load_exits_2(tmp_path):
    """A candidate with an op ORT does not know was exit 3 (ORT's Fail from the session)."""
    reference, candidate = tmp_path / "reference.onnx", tmp_path / "candidate.onnx"
    onnx.save(matmul_chain(), reference)
    broken = matmul_chain()
    broken.graph.node[1].domain = "custom.x"
    broken.opset_import.append(helper.make_opsetid("custom.x", 1))
    onnx.save(broken, candidate)
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(0).normal(size=(4, 1, 8)))
    result = CliRunner().invoke(main, ["compare", str(reference), str(candidate), "--data", str(data),
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {candidate}: ONNX Runtime cannot load this model: ")
    assert "custom.x:Relu(-1) is not a registered function/op" in result.stderr


def test_missing_external_data_file(tmp_path):
    path = external_model(tmp_path / "m", "weights.bin")
    with pytest.raises(ModelError, match=r"external data file 'weights.bin' is missing"):
        load_model(path)


def test_external_data_shorter_than_declared(tmp_path):
    path = external_model(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match=r"model.onnx: cannot read external data"):
        load_model(path)


@pytest.mark.parametrize("content, message", [
    (None, "not a readable ONNX model"),  # truncated: the first half of the sample model
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not"),
    (b"version: 1\ncalibration: {}\n", "not"),
    (b"\0" * 4096, "not"),
])
def test_truncated_or_foreign_model_files(tmp_path, content, message):
    model = tmp_path / "model.onnx"
    whole = (SAMPLE / "model.onnx").read_bytes()
    model.write_bytes(whole[: len(whole) // 2] if content is None else content)
    result = CliRunner().invoke(main, quantize_args(model, SAMPLE / "calib", tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and str(model) in result.stderr and message in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("where, tag", [("model.metadata_props[0].value", b"QQQQ"),
                                        ("model.graph.node[0].name", b"WWWW")])
def test_text_that_is_not_utf8_is_refused(tmp_path, where, tag):
    model = matmul_chain()
    model.metadata_props.add(key="note", value="QQQQ")
    model.graph.node[0].name = "WWWW"
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString().replace(tag, b"\xff\xfe" + tag[2:]))
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert str(info.value) == f"{path}: {where} holds text that is not valid UTF-8"


def test_model_onnx_runtime_cannot_load_is_a_model_error(tmp_path):
    model = matmul_chain()
    model.graph.node[1].op_type = "NoSuchOp"
    model.graph.node[1].domain = "example.custom"
    model.opset_import.add(domain="example.custom", version=1)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", [np.zeros((1, 8))])
    result = CliRunner().invoke(main, quantize_args(path, data, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {path}: ONNX Runtime cannot load this model: ")
    assert "NoSuchOp" in result.stderr and not (tmp_path / "out").exists()


def test_missing_model_file(tmp_path):
    result = CliRunner().invoke(main, quantize_args(tmp_path / "nope.onnx", SAMPLE / "calib", tmp_path / "out"))
    assert result.exit_code == 2 and result.stderr == f"Error: {tmp_path / 'nope.onnx'}: no such model file\n"


# --- hostile data ---------------------------------------------------------------------------

MARKER = "qtool-pickle-ran"


class Payload:
    """Unpickling this writes a marker file: proof that pickle code ran."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        return (Path.write_text, (Path(self.folder) / MARKER, "pwned"))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_pickled_object_arrays_are_refused_and_never_run(tmp_path, suffix):
    data = tmp_path / "data"
    data.mkdir()
    payload = np.array([Payload(tmp_path)], dtype=object)
    if suffix == ".npy":
        np.save(data / "0000.npy", payload, allow_pickle=True)
    else:
        np.savez(data / "0000.npz", x=payload)
    folder = DataFolder(data, model_inputs(matmul_chain()))
    with pytest.raises(DataError) as info:
        list(folder.batches(8))
    assert str(info.value).startswith(f"{data / ('0000' + suffix)}: ")
    assert "pickle" in str(info.value).lower() or "object" in str(info.value).lower()
    assert not (tmp_path / MARKER).exists()


def test_declared_shape_contradicting_the_data_is_refused():
    spec = InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))
    path = Path("data/0000.npy")
    assert fit_to_input(np.zeros((3, 8, 8), np.float32), spec, path).shape == (1, 3, 8, 8)
    for array in (np.zeros((1, 3, 9, 8), np.float32), np.zeros((8, 8), np.float32),
                  np.zeros((1, 1, 3, 8, 8), np.float32)):
        with pytest.raises(DataError) as info:
            fit_to_input(array, spec, path)
        assert str(info.value) == (f"{path}: array of shape {list(array.shape)} does not fit "
                                   "input x: float32 [N, 3, 8, 8]")
    with pytest.raises(DataError, match=r"dtype bool does not fit input x"):
        fit_to_input(np.zeros((1, 3, 8, 8), bool), spec, path)


# --- strings from models in reports ---------------------------------------------------------

HOSTILE_NAME = "<script>alert(1)</script>|`code`|[link](http://x)"


def test_md_escape_makes_model_strings_inert():
    escaped = md_escape(HOSTILE_NAME)
    assert "<script>" not in escaped and "&lt;script&gt;" in escaped
    assert "`" not in escaped.replace("\\`", "")
    assert "|" not in escaped.replace("\\|", "")
    assert "](" not in escaped


def test_hostile_names_are_escaped_in_report_md(tmp_path):
    weights = {"w": np.eye(8, dtype=np.float32)}
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], [HOSTILE_NAME], name=HOSTILE_NAME)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(HOSTILE_NAME, TensorProto.FLOAT, ["N", 8])], weights)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    data = save_npy_folder(tmp_path / "data", [np.random.RandomState(3).randn(1, 8) for _ in range(4)])
    result = CliRunner().invoke(main, quantize_args(path, data, tmp_path / "out", "-q"))
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
    assert md_escape(HOSTILE_NAME) in markdown


# --- hostile recipes ------------------------------------------------------------------------


def test_yaml_alias_bombs_and_self_references_are_refused(tmp_path):
    from qtool.errors import RecipeError
    from qtool.recipe.load import load_recipe

    laughs = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    cases = {"bomb.yaml": ("\n".join(laughs) + "\n", "YAML aliases expand this document past 100,000 values"),
             "self.yaml": ("calibration: &a [*a]\n", ":1: a YAML alias refers to itself"),
             "deep.yaml": ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        started = time.monotonic()
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert str(info.value).startswith(str(path)) and message in str(info.value), str(info.value)
        assert time.monotonic() - started < 20  # no hang: aliases are counted, never expanded


# --- regressions found by tests/test_fuzz.py ------------------------------------------------


def test_invalid_exclude_regex_is_a_recipe_error(tmp_path):
    from qtool.errors import RecipeError
    from qtool.recipe.load import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("quantization:\n  exclude:\n    nodes:\n    - (\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:3: quantization.exclude.nodes: .*not a valid regular"):
        load_recipe(path)


def test_npz_member_that_is_not_npy_is_a_data_error(tmp_path):
    import zipfile

    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "0000.npz", "w") as archive:
        archive.writestr("x", b"raw bytes, not an array")  # np.load hands back bytes for non-.npy members
    with pytest.raises(DataError, match=r"0000.npz: holds a member that is not a .npy array"):
        list(DataFolder(data, model_inputs(matmul_chain())).batches(8))
