"""Calibration: streaming equals batch, per-tensor overrides, and the calibration table file."""

from __future__ import annotations

import importlib
import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

import qtool
from conftest import ROOT, SAMPLE
from qtool.calibration.calibrate import calibrate as collect
from qtool.calibration.observers import OBSERVERS
from qtool.cli.main import main
from qtool.errors import RecipeError
from qtool.io.data import DataFolder, model_inputs
from qtool.numerics import QTYPES
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import CalibrationSpec

TENSORS = ["x", "mm", "act"]


def ranges(model, folder, spec: CalibrationSpec) -> dict:
    data = DataFolder(folder, model_inputs(model))
    table = collect(model, TENSORS, data, spec, QTYPES["uint8"], False)
    assert table.samples == 32
    return table.ranges


@pytest.mark.parametrize("method", sorted(OBSERVERS))
def test_streaming_equals_one_batch(tiny, method):
    """batch_size 1 and 16 over the same data give the same ranges within histogram resolution."""
    model, folder = tiny
    streamed = ranges(model, folder, CalibrationSpec(method=method, batch_size=1, percentile=99.9))
    batched = ranges(model, folder, CalibrationSpec(method=method, batch_size=16, percentile=99.9))
    for name in TENSORS:
        a, b = streamed[name], batched[name]
        width = max(a.hi, b.hi) - min(a.lo, b.lo)
        # Two histogram grids (the first batch sets the bin width; widening doubles it): a few bins.
        resolution = 4 * 2 * width / CalibrationSpec().bins
        if method == "entropy":
            # The KL curve is flat near its minimum: a different grid can move the chosen
            # threshold by tens of bins (seen: 7 % of the range on Laplace data, 32 samples).
            resolution = 0.05 * width
        assert a.method == b.method == method
        assert a.lo == pytest.approx(b.lo, abs=resolution), name
        assert a.hi == pytest.approx(b.hi, abs=resolution), name
        if method == "minmax":
            assert (a.lo, a.hi) == (b.lo, b.hi)


@pytest.mark.parametrize("budget, runs", [(10**9, 3), (16 * 64 * 4 * 3 * 4, 1 + 8), (10_000, 1 + 2 * 31)])
def test_runs_stay_under_the_memory_budget(tiny, monkeypatch, budget, runs):
    """Whatever the batch size: runs of as many samples as fit, or one pass per tensor group."""
    module = importlib.import_module("qtool.calibration.calibrate")  # `qtool.calibrate` is also the api function
    model, folder = tiny
    spec = CalibrationSpec(method="percentile", batch_size=16, percentile=99.9)
    expected = ranges(model, folder, spec)
    exposed = []
    real_run = module.run

    def recording_run(session, feeds):
        outputs = real_run(session, feeds)
        exposed.append(sum(value.nbytes for name, value in outputs.items() if name in TENSORS))
        return outputs

    monkeypatch.setattr(module, "MEMORY_BUDGET", budget)
    monkeypatch.setattr(module, "run", recording_run)
    seen = []
    data = DataFolder(folder, model_inputs(model))
    table = collect(model, TENSORS, data, spec, QTYPES["uint8"], False, progress=lambda *a: seen.append(a))
    assert len(exposed) == runs and max(exposed[1:]) <= budget  # the first run measures one sample
    # progress counts samples, whatever the passes: never more than 32, ending at 32 of 32 (finding 11)
    assert table.samples == 32 and seen[-1] == (32, 32) and {total for _, total in seen} == {32}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    one = folder.parent / f"one-{runs}"
    one.mkdir()
    shutil.copy(sorted(folder.glob("*.npy"))[0], one)
    seen.clear()
    collect(model, TENSORS, DataFolder(one, model_inputs(model)), spec, QTYPES["uint8"], False,
            progress=lambda *a: seen.append(a))
    assert seen == [(1, 1)]  # u2netp, 1 file: `calibrate: 1/2 samples`, never 1/1
    for name in TENSORS:  # the same samples, in other runs: the same ranges within two bins
        got, want = table.ranges[name], expected[name]
        resolution = 2 * 2 * (want.hi - want.lo) / CalibrationSpec().bins
        assert got.lo == pytest.approx(want.lo, abs=resolution) and got.hi == pytest.approx(want.hi, abs=resolution)


def test_overrides_first_match_wins(tiny):
    model, folder = tiny
    spec = CalibrationSpec(method="minmax", overrides=[
        {"tensor": "m.", "method": "percentile", "percentile": 90.0},
        {"tensor": "mm|act", "method": "entropy"},
    ])
    got = ranges(model, folder, spec)
    plain = ranges(model, folder, CalibrationSpec(method="minmax"))
    assert [got[name].method for name in TENSORS] == ["minmax", "percentile", "entropy"]
    assert (got["x"].lo, got["x"].hi) == (plain["x"].lo, plain["x"].hi)
    assert got["mm"].hi < plain["mm"].hi and got["mm"].lo > plain["mm"].lo  # 90th percentile clips
    assert got["mm"].summary["clipped_fraction"] == pytest.approx(0.1, abs=0.01)


def test_override_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration:\n  overrides:\n    - {tensor: 'a(', method: minmax}\n")
    with pytest.raises(RecipeError, match=r":3: calibration\.overrides\.0\.tensor: .*not a valid regular"):
        load_recipe(recipe)
    recipe.write_text("calibration:\n  overrides:\n    - tensor: a\n      methd: minmax\n")
    with pytest.raises(RecipeError, match=r":4: calibration\.overrides\.0\.methd: unknown key; "
                                          r"allowed here: method, percentile, tensor"):
        load_recipe(recipe)


# --- the table file and `quantize --calibration` ----------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A percentile table of the sample model, and a quick recipe (32 validation samples)."""
    folder = tmp_path_factory.mktemp("sample")
    recipe = folder / "recipe.yaml"
    recipe.write_text("version: 1\ncalibration: {method: percentile, percentile: 99.9, samples: 64}\n"
                      "validation: {samples: 32}\n")
    table = folder / "table.json"
    result = CliRunner().invoke(main, ["calibrate", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                                       "--recipe", str(recipe), "--output", str(table), "-q"])
    assert result.exit_code == 0, result.output
    return folder, recipe, table


def quantize(*args: str):
    return CliRunner().invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "-q", *args])


def test_table_contents(sample):
    folder, recipe, table = sample
    document = json.loads(table.read_text())
    assert (document["format"], document["version"], document["samples"]) == ("qtool-calibration", 1, 64)
    assert document["qtool_version"] == qtool.__version__
    assert document["model"]["sha256"] == qtool.io.model.file_sha256(SAMPLE / "model.onnx")
    assert len(document["data"]["listing_sha256"]) == 64
    assert document["recipe"]["resolved"]["calibration"]["method"] == "percentile"
    entry = next(iter(document["tensors"].values()))
    assert entry["method"] == "percentile" and entry["lo"] <= entry["hi"]
    assert {"p99.9", "clipped_fraction", "range_drift"} <= set(entry["summary"])
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml", "table.json"]  # no temp file left


def test_quantize_from_table_is_byte_identical(sample, tmp_path):
    """The ranges a table gives are those calibration measures. Bias correction is off: it needs the data
    (skipped with a table), and auto keeps it where measured to pay (7-bit weights: CPUs without VNNI)."""
    folder, _, table = sample
    recipe = folder / "no-bias-correction.yaml"
    recipe.write_text((folder / "recipe.yaml").read_text() + "quantization: {algorithms: {bias_correction: false}}\n")
    common = ["--recipe", str(recipe), "--validation-data", str(SAMPLE / "eval")]
    direct = quantize("--data", str(SAMPLE / "calib"), "--output", str(tmp_path / "direct"), *common)
    reused = quantize("--calibration", str(table), "--output", str(tmp_path / "reused"), *common)
    assert direct.exit_code == 0 and reused.exit_code == 0, reused.output
    assert (tmp_path / "direct" / "model.onnx").read_bytes() == (tmp_path / "reused" / "model.onnx").read_bytes()
    report = json.loads((tmp_path / "reused" / "report.json").read_text())
    assert report["calibration"]["table"] == str(table)
    assert report["calibration"]["method"] == "percentile"
    assert not any("bias_correction" in warning for warning in report["warnings"])  # off: nothing skipped


def test_a_table_made_with_another_recipe_is_named_in_a_warning_and_in_report_md(sample, tmp_path):
    """Finding 9: a table measured with percentile 99.9, used under a recipe saying entropy (and another
    input preprocessing), was accepted silently; the recipe's method silently did not apply."""
    from qtool.calibration.table_file import load_table, recipe_differences
    from qtool.recipe.load import load_recipe

    _, _, table = sample
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\ncalibration: {method: entropy, samples: 64}\nvalidation: {samples: 32}\n")
    result = CliRunner().invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "--calibration", str(table),
                                       "--recipe", str(other), "--validation-data", str(SAMPLE / "eval"),
                                       "--no-bench", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (f"calibration table {table} was made with calibration.method percentile (this recipe: entropy); "
            "calibration.percentile 99.9 (this recipe: 99.99): its ranges are used as measured") in text
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"Activation ranges from calibration table {table} (method percentile, 64 samples)." in markdown
    images = tmp_path / "images.yaml"
    images.write_text("version: 1\ncalibration: {method: percentile, percentile: 99.9}\n"
                      "data: {images: {size: [16, 16], layout: NCHW, channels: RGB, scale: 1}}\n")
    [warning] = recipe_differences(load_table(table), load_recipe(images))
    assert "data.images None (this recipe: {" in warning and "'scale': 1.0" in warning
    same = tmp_path / "same.yaml"
    same.write_text("version: 1\ncalibration: {method: percentile, percentile: 99.9, samples: 8}\n")
    assert recipe_differences(load_table(table), load_recipe(same)) == []  # samples do not change a range


def test_table_for_another_model_is_refused(sample, tmp_path):
    _, recipe, table = sample
    other = tmp_path / "model.onnx"
    model = onnx.load(str(SAMPLE / "model.onnx"))
    model.doc_string = "another file of the same graph"
    onnx.save(model, str(other))
    result = CliRunner().invoke(main, ["quantize", str(other), "--calibration", str(table), "--recipe", str(recipe),
                                       "--validation-data", str(SAMPLE / "eval"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"Error: {table}: calibration table was made for another model" in result.output
    assert not (tmp_path / "o").exists()


def test_table_without_a_needed_range_is_refused(sample, tmp_path):
    _, recipe, table = sample
    document = json.loads(table.read_text())
    dropped = sorted(document["tensors"])[0]
    del document["tensors"][dropped]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(document))
    result = quantize("--calibration", str(partial), "--recipe", str(recipe),
                      "--validation-data", str(SAMPLE / "eval"), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert f"{partial}: calibration table has no range for 1 tensor(s)" in result.output and dropped in result.output


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else", "version": 1}', 'expected "format": "qtool-calibration"'),
    ('{"format": "qtool-calibration", "version": 7}', "version 7 is not supported"),
    ('{"format": "qtool-calibration", "version": 1, "model": {"sha256": "0"}, '
     '"tensors": {"t": {"lo": 1, "hi": 0}}}', "tensors.t: lo 1 is above hi 0"),
    ('{"format": "qtool-calibration", "version": 1, "model": {"sha256": "0"}, '
     '"tensors": {"t": {"lo": "inf", "hi": 0}}}', "tensors.t.lo: expected a finite number"),
    ('{"format": "qtool-calibration", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
])
def test_malformed_table_is_refused(tmp_path, content, message):
    table = tmp_path / "table.json"
    table.write_text(content)
    result = quantize("--calibration", str(table), "--validation-data", str(SAMPLE / "eval"),
                      "--output", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {table}: ") and message in result.output


def test_calibration_table_usage_errors(sample, tmp_path):
    _, _, table = sample
    both = quantize("--data", str(SAMPLE / "calib"), "--calibration", str(table), "--output", str(tmp_path / "o"))
    assert both.exit_code == 2 and "not both" in both.output
    neither = quantize("--output", str(tmp_path / "o"))
    assert neither.exit_code == 2 and "--calibration" in neither.output
    no_eval = quantize("--calibration", str(table), "--output", str(tmp_path / "o"))
    assert no_eval.exit_code == 2 and "--validation-data" in no_eval.output
    exists = CliRunner().invoke(main, ["calibrate", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                                       "--output", str(table)])
    assert exists.exit_code == 2 and "pass --overwrite" in exists.output


def test_calibrate_help_has_an_example():
    result = CliRunner().invoke(main, ["calibrate", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "qtool calibrate model.onnx" in result.output


def test_shipped_recipes_still_load():
    for path in sorted((ROOT / "qtool" / "recipe" / "presets").glob("*.yaml")):
        assert load_recipe(path).calibration.overrides == []




def test_entropy_that_clips_over_one_percent_warns(tmp_path):
    """10 % of the input's values spread thinly far out: entropy's range cuts off half of them (5.1 %);
    calibrate says so on stderr, quantize in the report's warnings, both naming the tensor."""
    import numpy as np

    from conftest import FUSED, conv_gemm, save_npy_folder

    rng = np.random.default_rng(0)
    shape = (8, 1, 3, 8, 8)
    data = save_npy_folder(tmp_path / "data", np.where(rng.random(shape) < 0.1, rng.uniform(-100, 100, shape),
                                                        0.1 * rng.normal(size=shape)))
    model = tmp_path / "model.onnx"
    model.write_bytes(conv_gemm(np.random.default_rng(0)).SerializeToString())
    recipe = tmp_path / "entropy.yaml"
    recipe.write_text(FUSED + "calibration: {method: entropy}\n")
    expected = ("calibration.method entropy clipped more than 1 % of the calibration values of 1 tensor(s): x 5.1 %; "
                "clipping outliers can cost more accuracy than it gains (ppocr_cls: 14.1 dB vs 20.3 dB with minmax): "
                "try calibration.method minmax or auto, or a calibration.overrides entry for these tensors")
    result = CliRunner().invoke(main, ["calibrate", str(model), "--data", str(data), "--recipe", str(recipe),
                                       "--output", str(tmp_path / "table.json")])
    assert result.exit_code == 0, result.output
    assert f"warning: {expected}" in result.stderr.splitlines()
    report = qtool.quantize(model, data, recipe).report
    assert expected in report["warnings"]


def test_algorithms_a_table_skips_are_rows_of_report_md():
    """A new user's speech_embedding from a table: bias_correction (auto, the default) did not run, 25.62 dB
    against 26.32 dB from --data, and report.md had no word of it (report.json's `skipped` alone)."""
    from qtool.recipe.schema import Recipe
    from qtool.reporting.algorithms import algorithms_markdown, algorithms_section

    section = algorithms_section(Recipe(), [], None, None, None, None)  # what quantize --calibration gives
    rows = [line for line in algorithms_markdown(section, str) if line.startswith("| ") and "algorithm" not in line]
    assert rows == ["| bias_correction | skipped: needs calibration data (--data), not a calibration table |",
                    "| outliers | skipped: needs calibration data (--data), not a calibration table |"]
    off = Recipe.model_validate({"quantization": {"algorithms": {"bias_correction": False, "outliers": "off"}}})
    assert algorithms_markdown(algorithms_section(off, [], None, None, None, None), str) == []
