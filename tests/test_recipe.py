"""Recipe validation: every error names the file, the line and the key."""

from __future__ import annotations

import pytest

from qtool.errors import RecipeError
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe, recipe_json_schema


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return str(info.value)


def test_defaults_are_int8_per_channel():
    recipe = load_recipe(None)
    assert recipe.quantization.activations.dtype == "uint8"
    assert recipe.quantization.weights.dtype == "int8"
    assert recipe.quantization.weights.granularity == "per_channel"
    assert recipe.calibration.method == "minmax"


def test_shipped_int8_recipe_loads():
    from conftest import ROOT

    recipe = load_recipe(ROOT / "qtool" / "recipe" / "presets" / "int8.yaml")
    assert recipe.validation.gates == {"min_cosine": 0.98, "min_slice_sqnr_db": 10.0, "max_latency_ratio": 1.0}


def test_unknown_key_names_file_line_key_and_allowed(tmp_path):
    message = error_of(tmp_path, "version: 1\ncalibration:\n  method: minmax\n  sampels: 10\n")
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:4: calibration.sampels: unknown key")
    assert "samples" in message and "batch_size" in message


def test_bad_value_says_what_is_allowed(tmp_path):
    message = error_of(tmp_path, "quantization:\n  weights:\n    dtype: int3\n")
    assert ":3: quantization.weights.dtype: 'int3' is not allowed" in message
    assert "'int8'" in message and "'uint8'" in message


def test_wrong_type(tmp_path):
    message = error_of(tmp_path, "calibration:\n  batch_size: many\n")
    assert ":2: calibration.batch_size:" in message


def test_unknown_gate(tmp_path):
    message = error_of(tmp_path, "validation:\n  gates:\n    min_cosin: 0.9\n")
    # said as every other unknown key is (it read `validation.gates.min_cosin.[key]: 'min_cosin' is not allowed`)
    assert message.endswith(":3: validation.gates.min_cosin: unknown key; allowed here: 'min_cosine', "
                            "'min_sqnr_db', 'max_accuracy_drop', 'min_top1_agreement', 'max_latency_ratio', "
                            "'min_size_ratio', 'min_slice_sqnr_db' or 'min_exact_match'")


def test_duplicate_key(tmp_path):
    assert ":3: calibration: duplicate key" in error_of(tmp_path, "calibration: {}\nversion: 1\ncalibration: {}\n")


def test_python_tags_are_refused(tmp_path):
    message = error_of(tmp_path, "version: !!python/object/apply:os.system ['echo hacked']\n")
    assert "not valid YAML" in message and ":1" in message


def test_not_a_mapping(tmp_path):
    assert "a recipe is a mapping" in error_of(tmp_path, "- 1\n- 2\n")


def test_paths_resolve_relative_to_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, "validation:\n  data: eval\n"))
    assert recipe.resolve_path(recipe.validation.data) == (tmp_path / "eval").resolve()


def test_json_schema_lists_sections():
    schema = recipe_json_schema()
    assert set(schema["properties"]) == set(Recipe.model_fields) - {"source"} | {"base"}


@pytest.mark.parametrize("text, key", [
    ("calibration:\n  samples: yes\n", ":2: calibration.samples: True"),
    ("calibration:\n  batch_size: on\n", ":2: calibration.batch_size: True"),
    ("version: true\n", ":1: version: True"),
    ("quantization:\n  weights: {block_size: no}\n", ":2: quantization.weights.block_size: False"),
    ("validation:\n  gates:\n    min_cosine: 0.9\n    min_sqnr_db: yes\n", ":4: validation.gates.min_sqnr_db: True"),
    ("data:\n  images: {mean: [0.5, yes, 0.5]}\n", ":2: data.images.mean: [0.5, True, 0.5]"),
])
def test_booleans_are_not_numbers(tmp_path, text, key):
    message = error_of(tmp_path, text)
    assert key + " is not allowed: expected a number, not a boolean" in message


def test_booleans_stay_booleans_where_the_schema_says_so(tmp_path):
    recipe = load_recipe(write(tmp_path, "quantization:\n  weights: {symmetric: no, reduce_range: yes}\n"
                                         "  overrides:\n    - {match: {op_type: Conv}, float: yes}\n"))
    assert recipe.quantization.weights.symmetric is False and recipe.quantization.weights.reduce_range is True
    assert recipe.quantization.overrides[0].float is True


@pytest.mark.parametrize("text, message", [
    ("quantization:\n  activations: int8\n",
     ":2: quantization.activations: 'int8' is not allowed: expected a mapping of its keys: dtype, symmetric"),
    ("calibration: 5\n", ":1: calibration: 5 is not allowed: expected a mapping of its keys: batch_size, bins, "
                          "method, moving_average, overrides, percentile, samples, workers"),
    ("quantization:\n  overrides: [5]\n", ":2: quantization.overrides.0: 5 is not allowed: expected a mapping of "
                                           "its keys: activations, float, match, mode, weights"),
])
def test_a_value_where_a_section_belongs_names_the_sections_keys(tmp_path, text, message):
    """A new user's `activations: int8` read 'input should be a valid dictionary or instance of ActivationSpec'
    (a class name of the code, no allowed keys)."""
    error = error_of(tmp_path, text)
    assert message in error and "Spec" not in error


@pytest.mark.parametrize("gate, value, allowed", [
    ("min_cosine", ".nan", "finite number"),
    ("min_cosine", "5", "5 is outside what min_cosine measures: expected a cosine from -1 to 1"),
    ("min_sqnr_db", ".inf", "finite number"),
    ("min_slice_sqnr_db", "-.inf", "finite number"),
    ("min_top1_agreement", "1.5", "expected a fraction from 0 to 1"),
    ("max_accuracy_drop", "-2", "expected a fraction from -1 to 1"),
    ("max_latency_ratio", "0", "expected a ratio above 0"),
    ("min_size_ratio", "-1", "expected a ratio above 0"),
])
def test_gate_thresholds_in_their_range(tmp_path, gate, value, allowed):
    message = error_of(tmp_path, f"validation:\n  samples: 8\n  gates:\n    {gate}: {value}\n")
    assert f":4: validation.gates.{gate}:" in message and allowed in message


def test_gates_at_the_ends_of_their_ranges_load(tmp_path):
    recipe = load_recipe(write(tmp_path, "validation:\n  gates: {min_cosine: 1, min_top1_agreement: 0, "
                                         "max_accuracy_drop: 0, min_slice_sqnr_db: -10, max_latency_ratio: 1.5}\n"))
    assert recipe.validation.gates["min_cosine"] == 1.0 and recipe.validation.gates["min_slice_sqnr_db"] == -10.0


def test_compare_gates_from_the_command_line_and_the_api_have_the_same_ranges(tmp_path):
    from click.testing import CliRunner

    from qtool import api
    from qtool.cli.main import main
    from qtool.errors import UsageError

    result = CliRunner().invoke(main, ["compare", "a.onnx", "b.onnx", "--data", str(tmp_path), "--output",
                                       str(tmp_path / "out"), "--gate", "min_cosine=5"])
    assert result.exit_code == 2 and "'min_cosine=5': 5 is outside what min_cosine measures" in result.stderr
    with pytest.raises(UsageError, match="gate min_top1_agreement=-0.5: -0.5 is outside"):
        api.compare("a.onnx", "b.onnx", tmp_path, gates={"min_top1_agreement": -0.5})


def test_an_unknown_calibration_method_lists_every_allowed_one_auto_included(tmp_path):
    """A union of two Literals leaked pydantic's internals and left auto out of the allowed list."""
    message = error_of(tmp_path, "version: 1\ncalibration: {method: Auto}\n")
    assert message.endswith("recipe.yaml:2: calibration.method: 'Auto' is not allowed: input should be "
                            "'minmax', 'percentile', 'entropy', 'mse' or 'auto'")


@pytest.mark.parametrize("switch", ["outliers", "keep_float"])
def test_auto_off_switches_read_yaml_off_and_name_the_key_when_wrong(tmp_path, switch):
    """`quantization.algorithms.<switch>: auto | off`: YAML 1.1 reads a bare `off` as false, which the
    schema takes as "off"; any other word names the key."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"version: 1\nquantization:\n  algorithms:\n    {switch}: off\n")
    assert getattr(load_recipe(path).quantization.algorithms, switch) == "off"
    path.write_text(f"version: 1\nquantization:\n  algorithms:\n    {switch}: always\n")
    with pytest.raises(RecipeError, match=f"algorithms.{switch}"):
        load_recipe(path)


def test_the_default_recipe_is_int8_without_its_gates_and_help_says_so():
    """New-user finding: `--recipe` said `default: int8`, but with no recipe quantize ran without int8's gates
    (min_cosine 0.98, min_slice_sqnr_db 10, max_latency_ratio 1.0): exit 0 where `--recipe int8` fails."""
    from click.testing import CliRunner

    from qtool.cli.main import main

    default, int8 = load_recipe(None).as_dict(), load_recipe("int8").as_dict()
    assert int8["validation"].pop("gates") and default["validation"].pop("gates") == {}
    assert default == int8
    for command in ("quantize", "sensitivity"):
        shown = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "default: int8's settings without its gates" in shown
