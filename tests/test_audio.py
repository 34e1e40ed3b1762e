"""Audio files as calibration and validation data: decoded, mono, resampled, scaled, cut into the
model's chunks; a stateful audio model quantized from WAV files with its state carried."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.errors import DataError, RecipeError
from qtool.io.audio import chunks, read_audio
from qtool.io.feeds import open_data
from qtool.io.samples import model_inputs
from qtool.recipe.load import parse_recipe

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
FRAME, HIDDEN = 160, 16


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM; `samples` in [-1, 1), [frames] or [frames, channels]."""
    frames = samples if samples.ndim == 2 else samples[:, None]
    pcm = np.clip(np.round(frames * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(frames.shape[1])
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm.tobytes())
    return path


def _tone(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 + 300 * seed) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _model(path: Path, inputs, outputs, nodes, weights) -> Path:
    graph = helper.make_graph(nodes, "m", inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _frame_model(path: Path, shape) -> Path:
    """y = x (one input of the given shape): what the reader feeds, unchanged."""
    return _model(path, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                  [helper.make_node("Identity", ["x"], ["y"])], {})


def _recipe(tmp_path: Path, text: str):
    path = tmp_path / "audio.yaml"
    path.write_text("version: 1\nquantization: {placement: fused}\ndata:\n" + text)
    return parse_recipe(path.read_text(), path)


def test_wav_is_mono_scaled_and_cut_into_the_models_chunks(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    left, right = _tone(0.1, 16000, 1), _tone(0.1, 16000, 2)
    _write_wav(folder / "a.wav", np.stack([left, right], axis=1), 16000)  # 1600 frames, stereo
    model = onnx.load(_frame_model(tmp_path / "m.onnx", ["B", 1, "T"]))
    recipe = _recipe(tmp_path, "  audio: {sample_rate: 16000, chunk: 600, scale: 2.0}\n")
    samples = list(open_data(folder, model_inputs(model), None, recipe).samples())
    assert [name for name, _ in samples] == ["a.wav"] * 3  # 600 + 600 + 400 padded
    got = np.concatenate([feeds["x"] for _, feeds in samples], axis=2)
    assert got.shape == (1, 1, 1800) and got.dtype == np.float32
    want = np.round((left + right) / 2 * 32768) / 32768 * 2.0  # 16-bit PCM, averaged, scaled
    np.testing.assert_allclose(got[0, 0, :1600], want, atol=2.0 / 32768)
    assert not got[0, 0, 1600:].any()


def test_resampled_to_the_models_rate_and_the_frame_length_read_from_the_model(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    _write_wav(folder / "a.wav", _tone(0.5, 8000, 1), 8000)
    model = onnx.load(_frame_model(tmp_path / "m.onnx", [1, 1, FRAME]))
    recipe = _recipe(tmp_path, "  audio: {sample_rate: 16000, last: drop}\n")
    samples = list(open_data(folder, model_inputs(model), None, recipe).samples())
    assert len(samples) == 8000 // FRAME  # 0.5 s at 16 kHz, cut into the model's fixed frames
    joined = np.concatenate([feeds["x"].reshape(-1) for _, feeds in samples])
    spectrum = np.abs(np.fft.rfft(joined))
    assert abs(np.argmax(spectrum) * 16000 / joined.size - 500) < 20  # the 500 Hz tone kept its pitch


def test_chunks_with_hop_and_last(tmp_path):
    signal = np.arange(10, dtype=np.float32)
    assert [c.tolist() for c in chunks(signal, 4, 3, "drop")] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [c.tolist() for c in chunks(signal, 4, 4, "pad")][-1] == [8, 9, 0, 0]
    assert chunks(signal[:3], 4, 4, "drop") == []


def test_audio_errors_name_what_is_wrong(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    _write_wav(folder / "a.wav", _tone(0.1, 16000, 1), 16000)
    open_model = onnx.load(_frame_model(tmp_path / "m.onnx", ["B", 1, "T"]))
    with pytest.raises(DataError, match=r"holds audio .* the recipe needs a data\.audio section"):
        open_data(folder, model_inputs(open_model), None, _recipe(tmp_path, "  images: null\n"))
    with pytest.raises(RecipeError, match=r"data\.audio\.chunk is needed"):
        open_data(folder, model_inputs(open_model), None, _recipe(tmp_path, "  audio: {sample_rate: 16000}\n"))
    fixed = onnx.load(_frame_model(tmp_path / "f.onnx", [1, 1, FRAME]))
    with pytest.raises(RecipeError, match=r"data\.audio\.chunk 100: the model fixes it at 160"):
        open_data(folder, model_inputs(fixed), None, _recipe(tmp_path, "  audio: {chunk: 100}\n"))
    (folder / "b.wav").write_bytes(b"RIFF0000WAVEjunk")
    source = open_data(folder, model_inputs(fixed), None, _recipe(tmp_path, "  audio: {}\n"))
    with pytest.raises(DataError, match=r"b\.wav: not a readable"):
        list(source.samples())
    (folder / "b.wav").unlink()
    _write_wav(folder / "c.wav", np.zeros(0, np.float32), 16000)  # 0 frames: was padded into one silent chunk
    source = open_data(folder, model_inputs(fixed), None, _recipe(tmp_path, "  audio: {}\n"))
    with pytest.raises(DataError, match=r"c\.wav: holds 0 audio frames"):
        list(source.samples())


def test_flac_through_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    folder = tmp_path / "flac"
    folder.mkdir()
    tone = _tone(0.2, 16000, 1)
    soundfile.write(folder / "a.flac", tone, 16000, subtype="PCM_16")
    samples, rate = read_audio(folder / "a.flac")
    assert rate == 16000 and samples.shape == (tone.size, 1)
    np.testing.assert_allclose(samples[:, 0], tone, atol=1.0 / 32768)


def _stateful_audio_model(path: Path) -> Path:
    """A frame [1, 1, 160] and a state [1, 16] in; h_out = tanh(frame W + h U), y = h_out V out."""
    rng = np.random.default_rng(0)
    weights = {"W": rng.normal(0, 0.15, (FRAME, HIDDEN)), "U": rng.normal(0, 0.3, (HIDDEN, HIDDEN)),
               "V": rng.normal(0, 0.5, (HIDDEN, 3)), "flat": np.array([1, FRAME])}
    weights_f = {k: v for k, v in weights.items() if k != "flat"}
    nodes = [helper.make_node("Reshape", ["frame", "flat"], ["x"]),
             helper.make_node("MatMul", ["x", "W"], ["xw"], name="in"),
             helper.make_node("MatMul", ["h", "U"], ["hu"], name="rec"),
             helper.make_node("Add", ["xw", "hu"], ["s"], name="sum"),
             helper.make_node("Tanh", ["s"], ["h_out"], name="tanh"),
             helper.make_node("MatMul", ["h_out", "V"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 1, FRAME]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, HIDDEN])],
        [*(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights_f.items()),
         numpy_helper.from_array(weights["flat"].astype(np.int64), "flat")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_stateful_audio_model_quantized_from_wav_files_validated_as_streams(tmp_path):
    model_path = _stateful_audio_model(tmp_path / "vad.onnx")
    calib, evaluation = tmp_path / "calib", tmp_path / "eval"
    calib.mkdir(), evaluation.mkdir()
    for index in range(3):
        _write_wav(calib / f"{index}.wav", _tone(0.5, 22050, index), 22050)  # resampled to 16 kHz
        _write_wav(evaluation / f"{index}.wav", _tone(0.4, 16000, index + 3), 16000)
    recipe = tmp_path / "vad.yaml"
    recipe.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  audio: {sample_rate: 16000}\n  state:\n    carry: {h: h_out}\n"
                      "validation:\n  gates: {min_cosine: 0.99}\n")
    result = qtool.quantize(model_path, calib, recipe, tmp_path / "out", validation_data=evaluation)
    assert result.report["validation"]["samples"] == 3 * 40  # 0.4 s of 160-sample frames per file
    assert result.report["validation"]["outputs"]["y"]["cosine"] >= 0.99
    assert result.passed


@pytest.mark.skipif(not (SHARED_MODELS / "pyannote_seg3" / "model.onnx").is_file(),
                    reason="shared/models is not beside the repository")
def test_pyannote_fed_from_wav_files_of_its_own_calibration_audio(tmp_path):
    model = onnx.load(SHARED_MODELS / "pyannote_seg3" / "model.onnx")
    audio = np.load(SHARED_MODELS / "pyannote_seg3" / "calib" / "0000.npy").reshape(-1)
    folder = tmp_path / "wavs"
    folder.mkdir()
    _write_wav(folder / "0000.wav", audio, 16000)
    recipe = _recipe(tmp_path, "  audio: {sample_rate: 16000, chunk: 160000}\n")
    (name, feeds), = open_data(folder, model_inputs(model), None, recipe).samples()
    assert feeds["input"].shape == (1, 1, 160000)
    np.testing.assert_allclose(feeds["input"].reshape(-1), audio, atol=1.0 / 32768)


def test_without_soxr_a_file_at_another_rate_names_the_extra(tmp_path, monkeypatch):
    folder = tmp_path / "wavs"
    folder.mkdir()
    _write_wav(folder / "a.wav", _tone(0.1, 8000, 1), 8000)
    model = onnx.load(_frame_model(tmp_path / "m.onnx", [1, 1, FRAME]))
    monkeypatch.setitem(__import__("sys").modules, "soxr", None)
    monkeypatch.setitem(__import__("sys").modules, "soundfile", None)  # the standard library reads the WAV
    source = open_data(folder, model_inputs(model), None, _recipe(tmp_path, "  audio: {sample_rate: 16000}\n"))
    with pytest.raises(DataError, match=r"a\.wav: is at 8000 Hz, .* needs the `soxr` library .*qtool-onnx\[audio\]"):
        list(source.samples())
    same_rate = open_data(folder, model_inputs(model), None, _recipe(tmp_path, "  audio: {sample_rate: 8000}\n"))
    assert len(list(same_rate.samples())) == 800 // FRAME


def test_what_reading_does_unseen_is_said_once_each(tmp_path):
    """Resampled files, files too short for `last: drop`, .mp3 files and transcripts beside the WAVs: the
    report's warnings and `qtool calibrate`'s stderr say each once (nothing passed over silently)."""
    from click.testing import CliRunner

    from qtool.cli.main import main

    model_path = _stateful_audio_model(tmp_path / "vad.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    _write_wav(calib / "a.wav", _tone(0.3, 22050, 1), 22050)
    _write_wav(calib / "b.wav", _tone(0.3, 16000, 2), 16000)
    _write_wav(calib / "c.wav", _tone(0.005, 16000, 3), 16000)  # 80 frames: no whole 160-sample chunk
    (calib / "d.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00")
    (calib / "b.txt").write_text("a transcript\n")
    recipe = tmp_path / "vad.yaml"
    recipe.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  audio: {sample_rate: 16000, last: drop}\n  state:\n    carry: {h: h_out}\n")
    said = [
        "data.audio.sample_rate 16000: 1 of 3 audio file(s) resampled from 22050 Hz (a.wav)",
        "data.audio.last drop: 1 audio file(s) shorter than one chunk (160 samples) skipped (c.wav)",
        f"{calib}: 1 audio file(s) not read (d.mp3): qtool decodes .flac, .ogg, .wav; convert them to WAV or "
        "FLAC to use them",
        f"{calib}: 1 text file(s) not read (b.txt): data.audio reads the audio files",
    ]
    warnings = qtool.quantize(model_path, calib, recipe).report["warnings"]
    assert all(warnings.count(line) == 1 for line in said), warnings
    result = CliRunner().invoke(main, ["calibrate", str(model_path), "--data", str(calib), "--recipe", str(recipe),
                                       "--output", str(tmp_path / "table.json")])
    assert result.exit_code == 0, result.output
    assert all(f"note: {line}" in result.stderr for line in said)
    both = tmp_path / "both.yaml"
    both.write_text("version: 1\nquantization: {placement: fused}\ndata:\n  audio: {}\n  text: {tokenizer: t.json}\n")
    with pytest.raises(DataError, match=r"holds text \(b\.txt\) and audio files: give the recipe a data\.text or a "
                                        r"data\.audio section"):
        qtool.calibrate(model_path, calib, both)
    for path in calib.glob("*.wav"):
        path.unlink()
    with pytest.raises(DataError, match=r"no audio files; allowed: \.flac, \.ogg, \.wav \(d\.mp3 not read: convert"):
        qtool.calibrate(model_path, calib, recipe)
