"""The `qtool` command: outputs, exit codes and messages, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from conftest import ROOT, SAMPLE
from qtool import __version__
from qtool.cli.main import main
from qtool.cli.terminal import milliseconds_text


def qtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, cwd=ROOT)


def quantize_args(output, *extra):
    return ["quantize", str(SAMPLE / "model.onnx"), "--recipe", str(ROOT / "qtool" / "recipe" / "presets" / "int8.yaml"),
            "--data", str(SAMPLE / "calib"), "--validation-data", str(SAMPLE / "eval"),
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    result = qtool(*quantize_args(output))
    return output, result


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"qtool, version {__version__}"
    for args in (["--help"], ["quantize", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Example:" in result.output


def test_quantize_writes_model_and_reports(demo):
    output, result = demo
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["model.onnx", "report.html", "report.json", "report.md"]
    onnx.checker.check_model(onnx.load(str(output / "model.onnx")), full_check=True)
    report = json.loads((output / "report.json").read_text())
    assert report["passed"] is True and report["schema_version"] == 1
    assert "min_cosine" in (output / "report.md").read_text()


def test_sample_model_accuracy_and_size(demo):
    """Issue 2's bar: within 1 point of float, at least 3.5x smaller, integer kernels."""
    report = json.loads((demo[0] / "report.json").read_text())
    accuracy = report["validation"]["accuracy"]
    assert accuracy["labelled_samples"] == 300
    assert accuracy["drop"] <= 0.01, accuracy
    assert report["size"]["ratio"] >= 3.5, report["size"]
    assert report["kernels"]["integer_ops"]["QLinearConv"] == 3
    assert report["warnings"] == []
    model = onnx.load(str(demo[0] / "model.onnx"))
    float_model = onnx.load(str(SAMPLE / "model.onnx"))
    assert {p.key: p.value for p in model.metadata_props} == {p.key: p.value for p in float_model.metadata_props}


def test_failed_gate_exits_1_with_artifacts(tmp_path):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("version: 1\nvalidation:\n  gates: {min_cosine: 0.999999, min_top1_agreement: 0.5}\n")
    output = tmp_path / "out"
    args = quantize_args(output)
    args[args.index("--recipe") + 1] = str(recipe)
    result = qtool(*args)
    assert result.returncode == 1
    assert "gate min_cosine: FAILED" in result.stderr
    assert "min_top1_agreement" not in result.stderr  # passed gates are not listed as failures
    assert f"next: `qtool tune {SAMPLE / 'model.onnx'} --recipe {recipe} --data" in result.stderr
    gates = json.loads((output / "report.json").read_text())["gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("min_cosine", False), ("min_top1_agreement", True)]


def test_a_latency_only_failure_does_not_send_the_user_to_tune(tmp_path):
    """tune promotes nodes for accuracy; it cannot make int8 kernels faster (an impossible 0.01 ratio here)."""
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("version: 1\nvalidation:\n  gates: {min_cosine: 0.9, max_latency_ratio: 0.01}\n")
    args = quantize_args(tmp_path / "out")
    args[args.index("--recipe") + 1] = str(recipe)
    result = qtool(*args)
    assert result.returncode == 1
    assert "gate max_latency_ratio: FAILED" in result.stderr and "gate min_cosine" not in result.stderr
    assert "next: only the latency gate failed" in result.stderr and "qtool tune" not in result.stderr


def test_bad_recipe_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\ncalibration:\n  metod: minmax\n")
    output = tmp_path / "out"
    args = quantize_args(output)
    args[args.index("--recipe") + 1] = str(recipe)
    result = qtool(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {recipe}:3: calibration.metod: unknown key; allowed here: batch_size, bins, method, "
        "moving_average, overrides, percentile, samples, workers"
    ]
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [recipe]  # no temporary folder left either


def test_existing_output_needs_overwrite(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    result = qtool(*quantize_args(output))
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    assert qtool(*quantize_args(output, "--overwrite", "-q")).returncode == 0
    assert (output / "model.onnx").is_file()


def test_output_may_not_contain_the_input_model(tmp_path):
    result = qtool(*quantize_args(SAMPLE))
    assert result.returncode == 2 and "would contain the input model" in result.stderr


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"\x08\x07garbage that is not protobuf", "not"),
])
def test_unreadable_model_exits_2(tmp_path, content, message):
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    args = quantize_args(tmp_path / "out")
    args[1] = str(model)
    result = qtool(*args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_data_that_does_not_fit_names_the_file(tmp_path):
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "0000.npy", np.zeros((1, 1, 8, 8), np.float32))
    args = quantize_args(tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    result = qtool(*args)
    assert result.returncode == 2
    assert f"{data / '0000.npy'}: array of shape [1, 1, 8, 8] does not fit input image: float32 [N, 1, 16, 16]" \
        in result.stderr


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_json_flag_prints_only_json_on_stdout(tmp_path, command):
    if command == "quantize":
        args = quantize_args(tmp_path / "out", "--json")
    else:
        args = ["calibrate", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                "--output", str(tmp_path / "table.json"), "--json"]
    result = qtool(*args)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["command" if command == "quantize" else "format"] in ("quantize", "qtool-calibration")


def test_quantize_times_by_default_and_no_bench_skips(tmp_path):
    """Timed by default, and the summary shows the ratio: it showed only as a max_latency_ratio gate's row
    (or a slower-than-float warning), so a user without that gate never saw what was measured."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nvalidation: {gates: {min_cosine: 0.9}}\n")  # no latency gate
    reports, stdout = {}, {}
    for name, extra in (("timed", ()), ("untimed", ("--no-bench",))):
        args = quantize_args(tmp_path / name)
        args[args.index("--recipe") + 1] = str(recipe)
        result = subprocess.run([sys.executable, "-m", "qtool", *args, *extra], capture_output=True, text=True,
                                cwd=ROOT, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
        assert result.returncode == 0, result.stderr
        reports[name], stdout[name] = json.loads((tmp_path / name / "report.json").read_text()), result.stdout
    latency = reports["timed"]["latency"]
    assert latency["threads"] == 1 and latency["candidate"]["runs"] >= 20 and latency["ratio"] > 0
    low, high = latency["ratio_interval"]
    assert low <= latency["ratio"] <= high and isinstance(latency["tight"], bool)
    [row] = [line for line in stdout["timed"].splitlines() if line.startswith("│ latency ")]
    reference_ms, candidate_ms = (milliseconds_text(latency[model]["median_ms"]) for model in ("reference", "candidate"))
    assert (f"{reference_ms} → {candidate_ms} ms "
            f"({latency['ratio']:.2f}× float, 95 % interval {low:.2f}–{high:.2f}") in row
    assert "latency" not in reports["untimed"] and "│ latency " not in stdout["untimed"]


def test_slower_than_float_is_a_warning():
    from qtool.evaluation.validation import slower_than_float

    timing = {"reference": {"median_ms": 1.0}, "candidate": {"median_ms": 1.6, "runs": 40}, "tight": True}
    [warning] = slower_than_float({**timing, "ratio": 1.6, "ratio_interval": [1.55, 1.62]})
    assert ("slower than float: latency ratio 1.60 (95 % interval 1.55–1.62; 1.6 ms vs 1 ms float, 40 "
            "interleaved rounds)") in warning
    assert slower_than_float({**timing, "ratio": 0.6, "ratio_interval": [0.59, 0.61]}) == []
    # within the noise of 1.0 (an interval that holds 1): not "slower"
    assert slower_than_float({**timing, "ratio": 1.01, "ratio_interval": [0.97, 1.03]}) == []
    assert slower_than_float(None) == []
    # a busy machine: the interval never got tight and holds 1, which is said even when the ratio is below 1
    [noisy] = slower_than_float({**timing, "ratio": 0.9, "ratio_interval": [0.6, 1.3], "tight": False})
    assert "latency ratio 0.90 is noisy: its 95 % interval is 0.60–1.30 after 40 interleaved rounds" in noisy
    # noisy but clearly faster: nothing to say (the report's `tight` says it)
    assert slower_than_float({**timing, "ratio": 0.63, "ratio_interval": [0.6, 0.66], "tight": False}) == []


def test_labels_that_name_none_of_the_validation_files_exit_2(tmp_path):
    """Another data set's labels were ignored: accuracy n/a, and a max_accuracy_drop gate failed as if measured."""
    labels = tmp_path / "labels.txt"
    labels.write_text("clip_001.wav 3\nclip_002.wav 7\n")
    result = qtool(*quantize_args(tmp_path / "out"), "--labels", str(labels))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"Error: {labels}: names none of the ") and "validation files" in result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_cli_loads_is_one_line_and_exit_130():
    """A Ctrl-C in the seconds the CLI's imports take (numpy, onnx, ONNX Runtime) printed a 30-line
    KeyboardInterrupt traceback (a new user: `timeout -s INT 2 qtool quantize ...`). Made deterministic here:
    an import hook raises KeyboardInterrupt where onnxruntime is imported, as `python -m qtool` starts."""
    script = "\n".join([
        "import runpy, sys",
        "class CtrlC:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'onnxruntime':",
        "            raise KeyboardInterrupt",
        "sys.meta_path.insert(0, CtrlC())",
        "import qtool",
        "assert not {'numpy', 'onnx', 'onnxruntime'} & set(sys.modules), 'import qtool loaded the stack'",
        "sys.argv = ['qtool', '--version']",
        "runpy.run_module('qtool', run_name='__main__')",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert (result.returncode, result.stderr) == (130, "Interrupted: nothing was written.\n")
    assert qtool("--version").stdout.strip().endswith(__version__)  # without the hook it runs


def test_the_lazy_public_api_names_every_export_once():
    """`qtool.__all__` and the table `__getattr__` imports from are written out separately (pyflakes reads a
    literal __all__): each name in one is in the other and resolves to its object."""
    import qtool

    assert set(qtool.__all__) == {*qtool._HOMES, "__version__"}
    for name, home in qtool._HOMES.items():
        assert getattr(qtool, name) is getattr(__import__(home, fromlist=[name]), name)
    with pytest.raises(AttributeError):
        qtool.not_a_name  # noqa: B018
