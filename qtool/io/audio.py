"""Audio files become model inputs: decode → mono → resample to `sample_rate` → scale → chunks of the
model's frame length, one sample a chunk, a file's chunks in order (a stream, for a stateful model).

WAV (PCM 8/16/24/32-bit) is read with the standard library; FLAC, OGG and float WAV need `soundfile`,
resampling needs `soxr` (`pip install 'qtool-onnx[audio]'`).
"""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import numpy as np

from qtool.errors import DataError, RecipeError, reason
from qtool.io.batching import InputSpec
from qtool.io.data import file_digest
from qtool.io.samples import DataSource, listed_files
from qtool.recipe.inputs import AudioSpec

AUDIO_SUFFIXES = (".flac", ".ogg", ".wav")
# Audio that qtool does not decode: a folder's such files are named in a note, never passed over silently.
OTHER_AUDIO = (".aac", ".aif", ".aiff", ".amr", ".m4a", ".mp3", ".opus", ".wma")
INSTALL = "pip install 'qtool-onnx[audio]'"


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(samples as float32 in [-1, 1), [frames, channels]; the file's sample rate in Hz)."""
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the library's libsndfile is missing
        soundfile = None
    if soundfile is not None:
        try:
            samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:  # soundfile.LibsndfileError is a RuntimeError
            raise DataError(f"{path}: not a readable audio file ({reason(exc)})") from None
        return samples, int(rate)
    if path.suffix.lower() != ".wav":
        raise DataError(f"{path}: reading {path.suffix} files needs the `soundfile` library: {INSTALL}")
    return _read_wav(path)


def probe(path: Path) -> tuple[int, int] | None:
    """(sample rate in Hz, frames) from the file's header; None where it does not read (reading the
    file then says why)."""
    try:
        import soundfile
    except (ImportError, OSError):
        soundfile = None
    if soundfile is not None:
        try:
            info = soundfile.info(str(path))
        except (RuntimeError, OSError, ValueError, TypeError):
            return None
        return int(info.samplerate), int(info.frames)
    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as handle:
            return handle.getframerate(), handle.getnframes()
    except (wave.Error, EOFError, OSError):
        return None


def some(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, then how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def audio_notes(folder: Path, paths: list[Path], spec: AudioSpec, length: int) -> list[str]:
    """What the reader does to these files that the data does not show: formats it passes over, files
    resampled, files too short for a chunk that `last: drop` skips (from the headers: nothing decoded)."""
    notes = []
    others = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in OTHER_AUDIO) if folder.is_dir() else []
    if others:
        notes.append(f"{folder}: {len(others)} audio file(s) not read ({some(others)}): qtool decodes "
                     f"{', '.join(AUDIO_SUFFIXES)}; convert them to WAV or FLAC to use them")
    rates: dict[int, list[str]] = {}
    short = []
    for path in paths:
        header = probe(path)
        if header is None or header[0] <= 0:
            continue
        rate, frames = header
        if rate != spec.sample_rate:
            rates.setdefault(rate, []).append(path.name)
        if spec.last == "drop" and 0 < frames * spec.sample_rate / rate < length:
            short.append(path.name)
    if rates:
        names = [name for group in rates.values() for name in group]
        notes.append(f"data.audio.sample_rate {spec.sample_rate}: {len(names)} of {len(paths)} audio file(s) "
                     f"resampled from {', '.join(f'{rate} Hz' for rate in sorted(rates))} ({some(names)})")
    if short:
        notes.append(f"data.audio.last drop: {len(short)} audio file(s) shorter than one chunk ({length} samples) "
                     f"skipped ({some(short)})")
    return notes


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    try:
        with wave.open(str(path), "rb") as handle:
            width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            raw = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable PCM WAV file ({reason(exc)}); float WAV needs the "
                        f"`soundfile` library: {INSTALL}") from None
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widen to 32 bits
        bytes_ = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        padded = np.zeros((bytes_.shape[0], 4), np.uint8)
        padded[:, 1:] = bytes_
        samples = padded.view("<i4").reshape(-1).astype(np.float32) / 2.0**31
    else:
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    return samples.reshape(-1, channels), rate


def resample(samples: np.ndarray, rate: int, target: int, path: Path) -> np.ndarray:
    """Mono samples at `rate` Hz resampled to `target` Hz (soxr, high quality)."""
    if rate == target:
        return samples
    try:
        import soxr
    except ImportError as exc:
        raise DataError(f"{path}: is at {rate} Hz, data.audio.sample_rate is {target}: resampling needs the "
                        f"`soxr` library ({reason(exc)}): {INSTALL}") from None
    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32)


def chunk_layout(spec: AudioSpec, audio: InputSpec, batch_axis: int | None, where: str) -> tuple[int, tuple, int]:
    """(chunk length, one chunk's shape with the batch axis as 1, the axis time runs along) for this input.

    Time runs along the one dimension (but the batch) that is fixed above 1, else the last dimension the
    model leaves open; every other dimension must hold 1 (mono)."""
    if audio.shape is None or not audio.shape:
        raise DataError(f"{where}: audio feeds an input with a time axis; the model has {audio.describe()}")
    others = [axis for axis in range(len(audio.shape)) if axis != batch_axis]
    fixed = [axis for axis in others if isinstance(audio.shape[axis], int) and audio.shape[axis] > 1]
    open_ = [axis for axis in others if not (isinstance(audio.shape[axis], int) and audio.shape[axis] > 0)]
    if len(fixed) > 1:
        raise DataError(f"{where}: audio feeds an input with one time axis (mono); the model has "
                        f"{audio.describe()}: use .npy/.npz files of features instead")
    if fixed:
        axis, length = fixed[0], audio.shape[fixed[0]]
        if spec.chunk is not None and spec.chunk != length:
            raise RecipeError(f"{where}: data.audio.chunk {spec.chunk}: the model fixes it at {length} "
                              f"({audio.describe()}); set chunk to {length} or leave it out")
    elif open_:
        axis = open_[-1]
        if spec.chunk is None:
            raise RecipeError(f"{where}: data.audio.chunk is needed: the model's input {audio.describe()} "
                              "does not fix its frame length (samples per input)")
        length = spec.chunk
    else:
        raise DataError(f"{where}: audio feeds an input with a time axis; the model has {audio.describe()}")
    shape = tuple(length if index == axis else 1 for index in range(len(audio.shape)))
    return length, shape, axis


def chunks(samples: np.ndarray, length: int, hop: int, last: str) -> list[np.ndarray]:
    """Windows of `length` samples every `hop`; a short last one padded with zeros or dropped."""
    count = len(samples)
    starts = list(range(0, max(count - length, 0) + 1, hop)) if count >= length else []
    if last == "pad" and (not starts or starts[-1] + length < count):
        starts.append(starts[-1] + hop if starts else 0)
    pieces = []
    for start in starts:
        piece = samples[start:start + length]
        if len(piece) < length:
            piece = np.pad(piece, (0, length - len(piece)))
        pieces.append(piece)
    return pieces


class AudioSource(DataSource):
    """The audio files of a folder (or one file): each file one stream of chunks, named by its file."""

    def __init__(self, path: str | Path, inputs: list[InputSpec], limit: int | None, spec: AudioSpec,
                 where: str, skip: set[str] = frozenset()):
        super().__init__(inputs, limit)
        self.folder = Path(path)
        self.spec, self.recipe_where, self.skip = spec, where, set(skip)
        fed = [input_spec for input_spec in inputs if input_spec.name not in self.skip]
        if len(fed) != 1:
            raise DataError(f"{self.folder}: audio files feed one model input (besides state inputs); this "
                            f"model has {', '.join(s.name for s in fed)}: use .npz files keyed by input name")
        self.audio = fed[0]
        self.length, self.shape, self.time_axis = chunk_layout(spec, self.audio, self.axes[self.audio.name].axis,
                                                               where)
        self.hop = spec.hop or self.length
        self.paths = listed_files(self.folder, AUDIO_SUFFIXES)
        if not self.paths:
            others = listed_files(self.folder, OTHER_AUDIO)
            raise DataError(f"{self.folder}: no audio files; allowed: {', '.join(AUDIO_SUFFIXES)}"
                            + (f" ({some([p.name for p in others])} not read: convert to WAV or FLAC)" if others else ""))
        self.total = None  # chunks per file are known once decoded
        self.notes = tuple(audio_notes(self.folder, self.paths, spec, self.length))

    @property
    def files(self) -> list[str]:
        return [path.name for path in self.paths]

    def where(self, name: str) -> str:
        return str(self.folder / name) if self.folder.is_dir() else str(self.folder)

    def _raw(self):
        batch_axis = self.axes[self.audio.name].axis
        for path in self.paths:
            samples, rate = read_audio(path)
            if not len(samples):  # padded to one chunk, silence would calibrate and validate as data
                raise DataError(f"{path}: holds 0 audio frames; remove it or give it sound")
            mono = resample(samples.mean(axis=1), rate, self.spec.sample_rate, path) * np.float32(self.spec.scale)
            pieces = [piece.reshape(self.shape) for piece in chunks(mono, self.length, self.hop, self.spec.last)]
            if not pieces:
                continue  # shorter than one chunk, and `last: drop`
            stacked = (np.concatenate(pieces, axis=batch_axis) if batch_axis is not None
                       else np.stack(pieces))
            yield path.name, str(path), {self.audio.name: stacked.astype(np.float32)}

    def listing_hash(self) -> str:
        """sha256 over every audio file's name and bytes."""
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(path.name.encode() + b"\0" + file_digest(path))
        return digest.hexdigest()

    def reopen(self, limit: int | None) -> "AudioSource":
        other = AudioSource(self.folder, self.inputs, limit, self.spec, self.recipe_where, self.skip)
        other.state, other.notes = self.state, self.notes
        return other
