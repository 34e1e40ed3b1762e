"""Built-in presets: a recipe by name, the `qtool recipes` listing, and `base:` with overrides."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import ROOT
from qtool.cli.main import main
from qtool.errors import RecipeError
from qtool.recipe.load import load_recipe, parse_recipe
from qtool.recipe.schema import Recipe

PRESETS = ROOT / "qtool" / "recipe" / "presets"
NAMES = sorted(path.stem for path in PRESETS.glob("*.yaml"))


def test_a_bare_name_is_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in NAMES:
        assert load_recipe(name).as_dict() == load_recipe(PRESETS / f"{name}.yaml").as_dict()
    assert load_recipe("a16w8").quantization.activations.dtype == "uint16"


def test_a_file_of_that_name_wins_over_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int8").write_text("version: 1\ncalibration: {method: entropy}\n")
    assert load_recipe("int8").calibration.method == "entropy"


def test_unknown_name_lists_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("int9")
    assert str(info.value) == f"int9: no such recipe file, nor a preset ({', '.join(NAMES)})"


def test_recipes_lists_one_line_per_preset():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all(len(line.split(None, 1)) == 2 and len(line) <= 100 for line in lines)
    assert "A16W8: 16-bit activations, 8-bit weights" in result.output
    listed = CliRunner().invoke(main, ["recipes", "--json"])
    assert [entry["name"] for entry in __import__("json").loads(listed.output)] == NAMES


def test_base_preset_with_overrides(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: a16w8\ncalibration: {method: percentile}\nvalidation:\n  gates: {min_sqnr_db: 30}\n")
    mine, a16w8 = load_recipe(recipe), load_recipe("a16w8")
    assert mine.calibration.method == "percentile" != a16w8.calibration.method
    assert mine.calibration.batch_size == a16w8.calibration.batch_size
    assert mine.quantization == a16w8.quantization and mine.quantization != Recipe().quantization
    # sections merge key by key: the base's other gates stay
    assert mine.validation.gates["min_sqnr_db"] == 30
    assert mine.validation.gates["min_cosine"] == a16w8.validation.gates["min_cosine"]
    assert mine.source == recipe.resolve()


def test_base_file_beside_the_recipe_and_chains(tmp_path):
    (tmp_path / "team.yaml").write_text("base: int8\ncalibration: {samples: 64}\n")
    (tmp_path / "mine.yaml").write_text("base: team.yaml\ncalibration: {method: mse}\n")
    mine = load_recipe(tmp_path / "mine.yaml")
    assert (mine.calibration.method, mine.calibration.samples) == ("mse", 64)
    assert mine.quantization.weights == load_recipe("int8").quantization.weights


def test_base_file_climbing_out_of_a_folder_not_made_yet(tmp_path):
    """`qtool tune --output out/tuned` checks recipe.tuned.yaml (`base: ../../mine.yaml`) before out/tuned
    exists: the base was refused as 'neither a preset nor a file' and tune exited 2 after calibrating."""
    (tmp_path / "mine.yaml").write_text("base: int8\ncalibration: {samples: 64}\n")
    tuned = parse_recipe("base: ../../mine.yaml\ncalibration: {method: mse}\n",
                         tmp_path / "out" / "tuned" / "recipe.tuned.yaml")
    assert (tuned.calibration.method, tuned.calibration.samples) == ("mse", 64)
    assert tuned.files[1:] == ((tmp_path / "mine.yaml").resolve(),)


@pytest.mark.parametrize("text, message", [
    ("version: 1\nbase: nope\n", "mine.yaml:2: base: 'nope' is neither a preset ("),
    ("base: [int8]\n", "mine.yaml:1: base: ['int8'] is not allowed: a preset name ("),
    ("base: mine.yaml\n", "mine.yaml:1: base: 'mine.yaml' leads back to a recipe already in the chain"),
    ("base: int8\ncalibration:\n  methd: mse\n", "mine.yaml:3: calibration.methd: unknown key"),
])
def test_bad_base_names_the_file_and_line(tmp_path, text, message):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert message in str(info.value)


def test_quantize_accepts_a_preset_name_and_exits_2_on_an_unknown_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = ROOT / "sample_models" / "digits_cnn"
    args = ["quantize", str(sample / "model.onnx"), "--data", str(sample / "calib"), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--recipe", "int9", "--output", "bad"])
    assert result.exit_code == 2 and "nor a preset (a16w8, dynamic-int8, int8" in result.output
    assert not (tmp_path / "bad").exists()
