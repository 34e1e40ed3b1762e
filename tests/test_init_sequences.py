"""`qtool init` for sequence models: text beside a tokenizer.json, audio files, inputs named like state;
each recipe loads and `qtool quantize` runs it as written."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from click.testing import CliRunner

from conftest import fused_recipe
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
    result = api.quantize(model, data, fused_recipe(loaded))  # a tiny model: see conftest.FUSED
    assert result.report["validation"]["samples"] == 2 * 30


@pytest.mark.skipif(not (SHARED_MODELS / "albert_ja_pos" / "model.onnx").is_file(),
                    reason="shared/models is not beside the repository")
def test_a_transformer_gets_dynamic_int8_and_an_exact_match_gate(tmp_path):
    """albert_ja_pos: opaque input names mapped by order (marked CHECK); token inputs and a tokenizer make
    it a transformer: base dynamic-int8 (static int8 measured worse there), and its int64 tags get
    min_exact_match; `qtool quantize` runs the recipe as written."""
    model = tmp_path / "model.onnx"
    shutil.copy(SHARED_MODELS / "albert_ja_pos" / "model.onnx", model)
    _tokenizer(tmp_path / "tokenizer.json", list("今日は天気"), by_character=True)
    (tmp_path / "calib.txt").write_text("今日は良い天気\n")
    recipe = tmp_path / "r.yaml"
    init(model, "--data", tmp_path / "calib.txt", "--output", recipe)
    written = recipe.read_text()
    assert "# CHECK: the input names do not say which tokenizer output" in written
    assert "\nbase: dynamic-int8\n" in written and "activations: {dtype: uint8" not in written
    loaded = load_recipe(recipe)
    assert loaded.data.text.max_length == 256
    assert loaded.data.text.inputs == {"input.1": "input_ids", "onnx::Unsqueeze_1": "attention_mask",
                                       "input.3": "token_type_ids"}
    assert loaded.quantization.mode == "dynamic" and loaded.validation.gates["min_exact_match"] == 0.99
    result = api.quantize(model, tmp_path / "calib.txt", recipe)
    assert result.report["calibration"]["method"] == "none"  # dynamic: nothing calibrated
    assert result.report["validation"]["outputs"]["403"]["exact_match_masked_by"] == "onnx::Unsqueeze_1"


def test_integer_outputs_of_a_static_model_get_min_exact_match(tmp_path):
    """Not a transformer (float input): the int8 starter, and its ArgMax output a min_exact_match gate
    (cosine scores no integer output), no min_cosine."""
    from test_tune import hostile_model
    from conftest import save_npy_folder

    onnx_model = hostile_model()
    onnx_model.graph.node.append(helper.make_node("ArgMax", ["y"], ["tag"], axis=1, keepdims=0))
    del onnx_model.graph.output[:]
    onnx_model.graph.output.append(helper.make_tensor_value_info("tag", TensorProto.INT64, ["N"]))
    onnx.save(onnx_model, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    data = save_npy_folder(tmp_path / "calib", [rng.standard_normal((1, 16)) for _ in range(4)])
    recipe = tmp_path / "r.yaml"
    init(tmp_path / "model.onnx", "--data", data, "--output", recipe)
    loaded = load_recipe(recipe)
    assert "base:" not in recipe.read_text() and loaded.quantization.mode == "static"
    gates = dict(loaded.validation.gates)  # max_latency_ratio: unless init timed int8 above 0.9x float here
    assert gates.pop("max_latency_ratio", None) == (None if "No max_latency_ratio gate" in recipe.read_text() else 1.0)
    assert gates == {"min_exact_match": 0.95}


@pytest.mark.skipif(not (SHARED_MODELS / "pyannote_seg3" / "model.onnx").is_file(),
                    reason="shared/models is not beside the repository")
def test_an_open_frame_length_gets_the_shortest_files_whole_seconds(tmp_path):
    """pyannote_seg3 ([B, C, T], T open) from 10 s WAV files: a 10 s chunk (it got 1 s), marked CHECK,
    which the model runs."""
    from qtool.io.feeds import open_data
    from qtool.io.samples import model_inputs
    from qtool.runtime.session import make_session, run

    data = tmp_path / "wavs"
    data.mkdir()
    for index in range(2):
        _write_wav(data / f"{index}.wav", _tone(10.0 + index, 16000, index), 16000)
    recipe = tmp_path / "r.yaml"
    init(SHARED_MODELS / "pyannote_seg3" / "model.onnx", "--data", data, "--output", recipe)
    assert "# CHECK: the model leaves its frame length open" in recipe.read_text()
    loaded = load_recipe(recipe)
    assert loaded.data.audio.chunk == 160000 and loaded.data.audio.sample_rate == 16000
    model = onnx.load(SHARED_MODELS / "pyannote_seg3" / "model.onnx")
    _, feeds = next(open_data(data, model_inputs(model), None, loaded).samples())
    assert feeds["input"].shape == (1, 1, 160000)
    assert run(make_session(model), feeds)["output"].shape == (1, 589, 7)  # the window it was trained on


def test_array_data_and_state_inputs(tmp_path):
    from test_streams import _cell, _streams

    model = _cell(tmp_path / "cell.onnx")
    data = _streams(tmp_path / "calib", 2, seed=1)
    recipe = tmp_path / "r.yaml"
    init(model, "--data", data, "--output", recipe)
    loaded = load_recipe(recipe)
    assert loaded.data.state.carry == {"h": "h_out"} and loaded.data.images is None
    assert api.quantize(model, data, fused_recipe(loaded)).report["validation"]["samples"] == 48  # see conftest.FUSED
