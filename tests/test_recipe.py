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
    assert recipe.validation.gates == {"min_cosine": 0.98}


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
    assert ":3: validation.gates.min_cosin" in message


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
