"""--provider: ONNX Runtime execution providers chosen by name, refused when this build lacks them, recorded."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import SAMPLE, matmul_chain
from qtool.cli.main import main
from qtool.errors import UsageError
from qtool.runtime.session import make_session, parse_providers, use_providers


def test_names_options_and_order():
    assert parse_providers("CPU") == (("CPUExecutionProvider", {}),)
    assert parse_providers("AzureExecutionProvider, CPU:arena_extend_strategy=kSameAsRequested;x = 1") == (
        ("AzureExecutionProvider", {}), ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested",
                                                                 "x": "1"}))
    with pytest.raises(UsageError, match="option 'device_id' is not key=value"):
        parse_providers("CPU:device_id")
    # ORT's names are matched in any case, as people type them; one provider named twice is a mistake
    assert parse_providers("cpu") == parse_providers("cpuexecutionprovider") == (("CPUExecutionProvider", {}),)
    with pytest.raises(UsageError, match="execution provider CPUExecutionProvider is named twice"):
        parse_providers("CPU,cpu")


def test_sessions_get_the_chosen_providers_inside_the_block_only():
    model = matmul_chain()
    assert make_session(model).get_providers() == ["CPUExecutionProvider"]
    with use_providers(parse_providers("Azure,CPU")):
        assert make_session(model).get_providers() == ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert make_session(model).get_providers() == ["CPUExecutionProvider"]


def command_line(command: str, tmp_path) -> list[str]:
    """`command` on the sample model and its eval folder, writing under `tmp_path`."""
    model, data = str(SAMPLE / "model.onnx"), str(SAMPLE / "eval")
    return {"quantize": ["quantize", model, "--data", data, "--output", str(tmp_path / "out")],
            "calibrate": ["calibrate", model, "--data", data, "--output", str(tmp_path / "table.json")],
            "compare": ["compare", model, model, "--data", data, "--output", str(tmp_path / "out")],
            "sensitivity": ["sensitivity", model, "--data", data, "--output", str(tmp_path / "out")],
            "tune": ["tune", model, "--recipe", "int8", "--data", data, "--output", str(tmp_path / "out")]}[command]


@pytest.mark.parametrize("command", ["quantize", "calibrate", "compare", "sensitivity", "tune"])
def test_unavailable_provider_is_one_line_exit_2_listing_what_this_build_has(tmp_path, command):
    missing = "NoSuchAcceleratorExecutionProvider"
    args = command_line(command, tmp_path)
    result = CliRunner().invoke(main, [*args, "--provider", f"CPU,{missing}"])
    assert result.exit_code == 2
    assert result.output == (f"Error: execution provider '{missing}' is not in this onnxruntime build "
                             f"({ort.__version__}); it has: {', '.join(ort.get_available_providers())}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "calibrate", "compare", "sensitivity", "tune"])
@pytest.mark.parametrize("value", ["", " ", "CPU,"])
def test_an_empty_provider_name_is_exit_2_naming_those_this_build_has(tmp_path, command, value):
    """New-user finding: `--provider ""` ran on CPU (exit 0), as if the option were not given."""
    result = CliRunner().invoke(main, [*command_line(command, tmp_path), "--provider", value])
    assert result.exit_code == 2
    assert result.output == (f"Error: --provider {value!r} leaves a provider name empty; this onnxruntime build "
                             f"({ort.__version__}) has: {', '.join(ort.get_available_providers())}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "calibrate", "compare", "sensitivity", "tune"])
def test_an_option_the_provider_does_not_take_is_refused_naming_those_it_does(tmp_path, command):
    """New-user finding 18: `--provider CPU:bogus=1` ran (exit 0) and the report recorded `bogus` as applied."""
    args = command_line(command, tmp_path)
    result = CliRunner().invoke(main, [*args, "--provider", "CPU:bogus=1"])
    assert result.exit_code == 2
    assert result.output == (f"Error: execution provider CPUExecutionProvider: option bogus is not one it takes "
                             f"(onnxruntime {ort.__version__} would ignore it); its options: none\n")
    assert list(tmp_path.iterdir()) == []


def test_provider_is_recorded_and_cpu_results_are_unchanged(tmp_path):
    args = ["quantize", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"), "--validation-data",
            str(SAMPLE / "eval"), "--quiet"]
    default = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "default")])
    # Azure's provider claims no node here: every kernel still runs on CPU, so the figures must not move
    chosen = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "cpu"), "--provider", "Azure,CPU"])
    assert default.exit_code == chosen.exit_code == 0, default.output + chosen.output
    assert (tmp_path / "default" / "model.onnx").read_bytes() == (tmp_path / "cpu" / "model.onnx").read_bytes()
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("default", "cpu")]
    assert reports[0]["validation"] == reports[1]["validation"]
    assert reports[0]["execution_providers"] == [{"name": "CPUExecutionProvider", "options": {}}]
    assert [p["name"] for p in reports[1]["execution_providers"]] == ["AzureExecutionProvider", "CPUExecutionProvider"]


def test_search_trials_run_on_the_chosen_providers_and_rank_under_their_own_cache_key(tmp_path):
    """Trials run in worker processes, which do not inherit the parent's providers: the trial context
    carries them, the report records them, and a ranking measured on other providers is not reused."""
    args = ["sensitivity", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"), "--validation-data",
            str(SAMPLE / "eval"), "--samples", "4", "--jobs", "2", "--quiet"]
    default = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "default")])
    chosen = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "azure"), "--provider", "Azure,CPU",
                                       "--cache", str(tmp_path / "default" / "sensitivity.cache.json")])
    assert default.exit_code == chosen.exit_code == 0, default.output + chosen.output
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("default", "azure")]
    assert [p["name"] for p in reports[1]["execution_providers"]] == ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert [r["sensitivity"]["cache"]["hit"] for r in reports] == [False, False]
    # every kernel still runs on CPU: the same ranking
    assert [row["node"] for row in reports[0]["sensitivity"]["rows"]] == \
        [row["node"] for row in reports[1]["sensitivity"]["rows"]]
