"""The starter recipe's data section for sequence models: text (a tokenizer.json beside the model or
the data), audio files (their rate and the model's frame length), and inputs named like state paired
with the outputs that carry them."""

from __future__ import annotations

import difflib
import json
import re
import wave
from pathlib import Path

from onnx import ModelProto

from qtool.io.batching import InputSpec, batch_axes
from qtool.io.samples import listed_files
from qtool.io.feeds import file_kind
from qtool.io.text import ROLE_HINTS, fixed_lengths
from qtool.recipe.inputs import TEXT_ROLES
from qtool.recipe.load import recipe_path_text

# An input or output name that says "state": h0, c0, hn, state, hidden, h_out, past_key, cache, memory...
STATE_NAME = re.compile(r"(?:^|[^a-z])(?:[hc][0-9n]?|state[s]?|hidden|cache|past\w*|memory|carry)(?:[^a-z]|$)",
                        re.IGNORECASE)
TOKENIZER = "tokenizer.json"
AUDIO_HEADERS = 256  # WAV headers read for the rate and the shortest file
MAX_WINDOW_S = 30  # the longest chunk init proposes for a model that leaves it open
TRANSFORMER_BASE = "dynamic-int8"  # static int8 measured worse on transformers (docs/recipe.md)


def _shape(value) -> tuple:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def state_pairs(model: ModelProto, inputs: list[InputSpec]) -> dict[str, str]:
    """State input -> the output that carries it: inputs named like state, each paired with the
    unclaimed output of the same type and shape whose name is most like its own."""
    outputs = [value for value in model.graph.output]
    pairs: dict[str, str] = {}
    for spec in inputs:
        if not STATE_NAME.search(spec.name) or spec.shape is None or len(pairs) + 1 >= len(inputs):
            continue
        value = next(v for v in model.graph.input if v.name == spec.name)
        fits = [out for out in outputs if out.name not in pairs.values()
                and out.type.tensor_type.elem_type == value.type.tensor_type.elem_type
                and _shape(out) == spec.shape]
        if fits:
            best = max(fits, key=lambda out: (bool(STATE_NAME.search(out.name)),
                                              difflib.SequenceMatcher(None, spec.name, out.name).ratio()))
            pairs[spec.name] = best.name
    return pairs


def _tokenizer(model_path: Path, data: Path) -> Path | None:
    folder = data if data.is_dir() else data.parent
    return next((path for path in (model_path.parent / TOKENIZER, folder / TOKENIZER) if path.is_file()), None)


def is_transformer(model_path: Path, data: Path | None, inputs: list[InputSpec]) -> bool:
    """Token inputs: every input integer (input_ids, attention_mask, ...), with a tokenizer.json beside
    the model or the data, or text data to tokenize."""
    if not inputs or not all(spec.dtype.kind in "iu" for spec in inputs):
        return False
    folder = data if data is None or data.is_dir() else data.parent
    beside = [model_path.parent / TOKENIZER] + ([folder / TOKENIZER] if folder is not None else [])
    return any(path.is_file() for path in beside) or (data is not None and file_kind(data) == "text")


def text_lines(model_path: Path, data: Path, inputs: list[InputSpec], base: Path) -> list[str]:
    tokenizer = _tokenizer(model_path, data)
    lines = ["  text:"]
    if tokenizer is not None:
        lines.append(f"    tokenizer: {recipe_path_text(tokenizer, base)}   # found beside the "
                     + ("model" if tokenizer.parent == model_path.parent else "data"))
    else:
        lines += [f"    # CHECK: no {TOKENIZER} beside the model or the data: name the model's tokenizer",
                  f"    tokenizer: {TOKENIZER}"]
    fixed = fixed_lengths(inputs, {spec.name for spec in inputs})
    if len(fixed) == 1:
        lines.append(f"    max_length: {fixed.pop()}       # the model's fixed sequence length")
    else:
        lines.append("    max_length: 128       # CHECK: the model leaves the length open; the length you feed")
    lines.append("    padding: max_length   # max_length | none")
    guessed = {spec.name: next((role for hint, role in ROLE_HINTS if hint in spec.name.lower()), None)
               for spec in inputs}
    if all(guessed.values()):
        lines.append("    # inputs by name: " + ", ".join(f"{name} <- {role}" for name, role in guessed.items()))
    else:
        roles = dict(zip([spec.name for spec in inputs], TEXT_ROLES))
        lines += ["    # CHECK: the input names do not say which tokenizer output each takes; guessed by order",
                  "    inputs: {" + ", ".join(f"{json.dumps(name)}: {role}" for name, role in roles.items()) + "}"]
    return lines


def _wav_headers(data: Path) -> list[tuple[int, int]]:
    """(sample rate, frames) of the first AUDIO_HEADERS WAV files whose header reads."""
    headers = []
    for path in listed_files(data, (".wav",))[:AUDIO_HEADERS]:
        try:
            with wave.open(str(path), "rb") as handle:
                headers.append((handle.getframerate(), handle.getnframes()))
        except (wave.Error, EOFError, OSError):
            continue
    return headers


def window_seconds(headers: list[tuple[int, int]]) -> int:
    """Whole seconds of the shortest WAV file (1..MAX_WINDOW_S; 1 without any): the longest window every
    file fills without zero padding, for a model that leaves its frame length open."""
    shortest = min((frames / rate for rate, frames in headers if rate > 0), default=1.0)
    return int(min(max(shortest, 1.0), MAX_WINDOW_S))


def audio_lines(data: Path, audio: InputSpec, batch_axis: int | None) -> list[str]:
    headers = _wav_headers(data)
    rate = headers[0][0] if headers else None
    lines = ["  audio:"]
    if rate is not None:
        lines.append(f"    sample_rate: {rate}    # CHECK: read from the first WAV file; the rate the model "
                     "expects (other files are resampled)")
    else:
        lines.append("    sample_rate: 16000    # CHECK: the rate the model expects (files are resampled)")
    others = [d for a, d in enumerate(audio.shape or ()) if a != batch_axis]
    if not any(isinstance(d, int) and d > 1 for d in others):
        seconds = window_seconds(headers)
        why = (f"whole seconds of the shortest data file, at most {MAX_WINDOW_S}" if headers
               else "no WAV header to measure the files by")
        lines += ["    # CHECK: the model leaves its frame length open, so this is no figure of the model's:",
                  f"    # {seconds} s ({why}). Use the window your application feeds it,",
                  "    # often the one it was trained on (pyannote segmentation: 10 s).",
                  f"    chunk: {seconds * (rate or 16000)}"]
    else:
        lines.append("    # chunk: the model's fixed frame length")
    lines += ["    last: pad             # pad | drop: a last chunk shorter than `chunk`",
              "    scale: 1.0            # samples in [-1, 1) times this (32768: the int16 range)"]
    return lines


def state_lines(pairs: dict[str, str]) -> list[str]:
    return ["  # Inputs named like state, each paired with the output of its type and shape: every data file",
            "  # runs as one stream, each chunk fed the state the one before returned (first state: zeros).",
            "  state:",
            "    carry: {" + ", ".join(f"{json.dumps(name)}: {json.dumps(output)}" for name, output in pairs.items())
            + "}   # CHECK"]


def sequence_data_lines(model: ModelProto, model_path: Path, inputs: list[InputSpec], data: Path | None,
                        base: Path) -> tuple[str | None, list[str]]:
    """(raw data kind, the lines under `data:` for text or audio and state); ([], None) for neither."""
    pairs = state_pairs(model, inputs)
    fed = [spec for spec in inputs if spec.name not in pairs]
    kind = file_kind(data) if data is not None else None
    if kind == "text+audio":  # audio and transcripts, say: token inputs read the text, others the audio
        kind = "text" if fed and all(spec.dtype.kind in "iu" for spec in fed) else "audio"
    lines: list[str] = []
    if kind == "text":
        lines += text_lines(model_path, data, fed, base)
    elif kind == "audio" and len(fed) == 1:
        lines += audio_lines(data, fed[0], batch_axes(inputs)[fed[0].name].axis)
    else:
        kind = None
    if pairs:
        lines += state_lines(pairs)
    return kind, lines
