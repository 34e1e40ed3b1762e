"""`qtool init` for sequence models: text beside a tokenizer.json, audio files, inputs named like state;
each recipe loads and `qtool quantize` runs it as written."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from qtool import api
from qtool.cli.main import main
from qtool.recipe.load import load_recipe
from test_audio import SHARED_MODELS, _stateful_audio_model, _tone, _write_wav
from test_text import _encoder, _sentences, _tokenizer, WORDS

pytest.importorskip("tokenizers")


def init(*args) -> str:
    result = CliRunner().invoke(main, ["init", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_text_data_and_a_tokenizer_beside_the_model(tmp_path):
    model = _encoder(tmp_path / "enc.onnx", 16)
    _tokenizer(tmp_path / "tokenizer.json", WORDS)
    data = tmp_path / "calib"
    data.mkdir()
    (data / "lines.txt").write_text("\n".join(_sentences(1, 12)) + "\n")
    recipe = tmp_path / "recipes" / "r.yaml"
    init(model, "--data", data, "--output", recipe)
    text = recipe.read_text()
    assert "tokenizer: ../tokenizer.json   # found beside the model" in text
    loaded = load_recipe(recipe)
    assert loaded.data.text.max_length == 16 and loaded.data.text.inputs is None  # names say the roles
    assert loaded.data.state is None and loaded.data.audio is None
    assert api.quantize(model, data, recipe).report["validation"]["samples"] == 12


def test_audio_files_and_state_inputs(tmp_path):
    model = _stateful_audio_model(tmp_path / "vad.onnx")
    data = tmp_path / "wavs"
    data.mkdir()
    for index in range(2):
        _write_wav(data / f"{index}.wav", _tone(0.3, 16000, index), 16000)
    recipe = tmp_path / "r.yaml"
    init(model, "--data", data, "--output", recipe)
    loaded = load_recipe(recipe)
    assert loaded.data.audio.sample_rate == 16000 and loaded.data.audio.chunk is None  # the model fixes 160
    assert loaded.data.state.carry == {"h": "h_out"}
    result = api.quantize(model, data, recipe)
    assert result.report["validation"]["samples"] == 2 * 30


@pytest.mark.skipif(not (SHARED_MODELS / "albert_ja_pos" / "model.onnx").is_file(),
                    reason="shared/models is not beside the repository")
def test_opaque_input_names_are_mapped_by_order_and_marked_check(tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(SHARED_MODELS / "albert_ja_pos" / "model.onnx", model)
    _tokenizer(tmp_path / "tokenizer.json", list("今日は天気"), by_character=True)
    (tmp_path / "calib.txt").write_text("今日は良い天気\n")
    recipe = tmp_path / "r.yaml"
    init(model, "--data", tmp_path / "calib.txt", "--output", recipe)
    assert "# CHECK: the input names do not say which tokenizer output" in recipe.read_text()
    text = load_recipe(recipe).data.text
    assert text.max_length == 256
    assert text.inputs == {"input.1": "input_ids", "onnx::Unsqueeze_1": "attention_mask", "input.3": "token_type_ids"}


def test_array_data_and_state_inputs(tmp_path):
    from test_streams import _cell, _streams

    model = _cell(tmp_path / "cell.onnx")
    data = _streams(tmp_path / "calib", 2, seed=1)
    recipe = tmp_path / "r.yaml"
    init(model, "--data", data, "--output", recipe)
    loaded = load_recipe(recipe)
    assert loaded.data.state.carry == {"h": "h_out"} and loaded.data.images is None
    assert api.quantize(model, data, recipe).report["validation"]["samples"] == 48
