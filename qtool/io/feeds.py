"""Which reader a data argument gets (`open_data`: arrays and images, text, audio, or Python feeds, with a
stateful model's state attached), and feeds from Python: an iterable of `{input_name: array}` dicts,
an object with ONNX Runtime's `CalibrationDataReader` interface (`get_next()` until None), or a
function returning either (`--data-loader file.py:function`, which runs that file's code).

A list (or any iterable that can be iterated again) and a function are read afresh each pass; a
one-shot iterator or reader is kept in memory as it is read (up to the sample limit), since
calibration and validation may read the data more than once. Feeds without a len() (a generator, a
reader) and no sample limit are read up to UNSIZED_CAP samples, with a note when there were more.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from qtool.errors import DataError, UsageError
from qtool.io.audio import AUDIO_SUFFIXES, OTHER_AUDIO, AudioSource, some
from qtool.io.batching import InputSpec
from qtool.io.data import DATA_SUFFIXES, DataFolder
from qtool.io.samples import DataSource, listed_files
from qtool.io.streams import stream_state
from qtool.io.text import TEXT_SUFFIXES, TextSource
from qtool.recipe.schema import Recipe


@dataclass(frozen=True)
class Loader:
    """A user's function that returns feeds, loaded from `path` (`--data-loader path:function`)."""

    path: Path
    function: Callable[[], Any]
    name: str

    def __call__(self):
        return self.function()

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


def load_loader(spec: str) -> Loader:
    """Import `path/to/file.py:function` (this runs the file's code) and return that function."""
    path_text, _, name = str(spec).rpartition(":")
    path = Path(path_text)
    if not path_text or not name.isidentifier():
        raise UsageError(f"--data-loader {spec}: expected path/to/file.py:function")
    if not path.is_file() or path.suffix != ".py":
        raise UsageError(f"--data-loader {spec}: {path} is not a Python file (.py)")
    module_name = f"qtool_data_loader_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any exception is theirs to see, on one line
        sys.modules.pop(module_name, None)
        raise UsageError(f"--data-loader {spec}: importing {path} raised {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"--data-loader {spec}: {path} has no function {name}")
    return Loader(path, function, name)


def open_data(data, inputs: list[InputSpec], limit: int | None, recipe: Recipe | None = None) -> DataSource:
    """A data source for what `--data` or the Python API was given: a path, an iterable of feed dicts,
    a CalibrationDataReader or a function returning one of those. The recipe's `data` section says how
    images, text and audio files become inputs, and which inputs carry a stateful model's state."""
    if isinstance(data, DataSource):
        return data.reopen(limit) if data.inputs == inputs else data.with_inputs(inputs).reopen(limit)
    spec = recipe.data if recipe is not None else None
    where = str(recipe.source) if recipe is not None and recipe.source else "recipe"
    state = (stream_state(spec.state, inputs, recipe.resolve_path(spec.state.initial), where)
             if spec is not None and spec.state is not None else None)
    skip = set(state.carry) if state else set()
    if isinstance(data, (str, Path)):
        path = Path(data)
        kind = file_kind(path)
        passed_over = ()
        if kind == "text+audio":  # e.g. WAV files and their transcripts: the recipe's one section says which
            kind, passed_over = _one_kind(path, spec)
        if kind == "text":
            if spec is None or spec.text is None:
                raise DataError(f"{path}: holds text ({', '.join(TEXT_SUFFIXES)}); the recipe needs a data.text "
                                "section saying how to tokenize it (tokenizer, max_length, ...)")
            source: DataSource = TextSource(path, inputs, limit, spec.text, recipe.resolve_path(spec.text.tokenizer),
                                            where, skip)
        elif kind == "audio":
            if spec is None or spec.audio is None:
                raise DataError(f"{path}: holds audio ({', '.join(AUDIO_SUFFIXES)}); the recipe needs a data.audio "
                                "section saying how to cut it (sample_rate, chunk, ...)")
            source = AudioSource(path, inputs, limit, spec.audio, where, skip)
        else:
            source = DataFolder(path, inputs, limit, images=spec.images if spec is not None else None)
        source.notes = (*source.notes, *passed_over)
    elif callable(data) or hasattr(data, "get_next") or isinstance(data, Iterable):
        source = FeedSource(data, inputs, limit)
    else:
        raise UsageError(f"data: expected a folder, a .npy/.npz file, an iterable of {{input name: array}} dicts "
                         f"or an object with get_next(); got {type(data).__name__}")
    source.state = state
    return source


def file_kind(path: Path) -> str | None:
    """"text" or "audio" when the file, or every data file of the folder, is one (audio in formats qtool
    does not decode, .mp3 and the like, counts: the audio reader names them); "text+audio" for a folder
    of both and nothing else; else None (arrays, images)."""
    if not path.exists():
        return None
    audio = (*AUDIO_SUFFIXES, *OTHER_AUDIO)
    suffixes = {item.suffix.lower() for item in listed_files(path, (*TEXT_SUFFIXES, *audio, *DATA_SUFFIXES))}
    if suffixes and suffixes <= set(TEXT_SUFFIXES):
        return "text"
    if suffixes and suffixes <= set(audio):
        return "audio"
    if suffixes and suffixes <= {*TEXT_SUFFIXES, *audio}:
        return "text+audio"
    return None


def _one_kind(folder: Path, spec) -> tuple[str, tuple[str, ...]]:
    """The kind a folder of text and audio files is read as: the one the recipe's data section has a
    section for; and a note naming the files of the other kind, which are not read."""
    kinds = [kind for kind in ("text", "audio") if spec is not None and getattr(spec, kind) is not None]
    texts = [path.name for path in listed_files(folder, TEXT_SUFFIXES)]
    if len(kinds) != 1:
        raise DataError(f"{folder}: holds text ({texts[0]}) and audio files: give the recipe a data.text or a "
                        "data.audio section (the kind to read, not both), or keep one kind per folder")
    other = texts if kinds[0] == "audio" else [path.name for path in listed_files(folder, AUDIO_SUFFIXES)]
    return kinds[0], (f"{folder}: {len(other)} {'text' if kinds[0] == 'audio' else 'audio'} file(s) not read "
                      f"({some(other)}): data.{kinds[0]} reads the {kinds[0]} files",) if other else ()


class _Replay:
    """A one-shot stream of feed dicts, remembered as read so that it can be read again."""

    def __init__(self, stream: Iterator):
        self.stream: Iterator | None = stream
        self.seen: list = []

    def __iter__(self):
        index = 0
        while True:
            if index < len(self.seen):
                yield self.seen[index]
            elif self.stream is None:
                return
            else:
                item = next(self.stream, None)
                if item is None:
                    self.stream = None
                    return
                self.seen.append(item)
                yield item
            index += 1


def _length(data) -> int | None:
    """len(data) where it has one (ORT's CalibrationDataReader raises NotImplementedError)."""
    if callable(data) or not hasattr(data, "__len__"):
        return None
    try:
        return len(data)
    except (NotImplementedError, TypeError):
        return None


def _reader_items(reader) -> Iterator:
    while (item := reader.get_next()) is not None:
        yield item


# Samples read from feeds without a len() when neither calibration.samples nor validation.samples
# limits them: an endless generator would otherwise run forever (and a one-shot one fill memory, each
# sample kept for the next pass). 256 is the count the README's recipe example reads; a note says
# when the feeds had more, and calibration.samples / validation.samples set another count.
UNSIZED_CAP = 256


class FeedSource(DataSource):
    """Feed dicts handed over from Python; samples are named `sample N`."""

    def __init__(self, data, inputs: list[InputSpec], limit: int | None = None, *, _replay: _Replay | None = None):
        super().__init__(inputs, limit)
        self.data = data
        self.folder = str(data) if isinstance(data, Loader) else f"<{type(data).__name__} from Python>"
        self._replay = _replay
        if _replay is None and not callable(data) and (hasattr(data, "get_next") or iter(data) is data):
            self._replay = _Replay(_reader_items(data) if hasattr(data, "get_next") else iter(data))
        size = _length(data)
        self.total = min(size, limit) if size is not None and limit else size
        # [True] once feeds without a len() gave more than UNSIZED_CAP samples; a list, so that the
        # copies calibration reads through (with_inputs) tell this source too
        self._cut_short = [False]

    @property
    def notes(self) -> tuple[str, ...]:
        if not self._cut_short[0]:
            return ()
        return (f"{self.folder}: read its first {UNSIZED_CAP} samples only: it has no len() and gave more (an "
                "endless generator would run forever); set calibration.samples (validation.samples for "
                "validation) to read another count",)

    def where(self, name: str) -> str:
        return f"{self.folder} {name}"

    def _items(self) -> tuple[Iterator, bool]:
        """The feeds, and whether they have a len() (else UNSIZED_CAP bounds them)."""
        if self._replay is not None:
            return iter(self._replay), _length(self.data) is not None
        try:
            source = self.data() if callable(self.data) else self.data
        except Exception as exc:  # the user's code raised before producing any sample: theirs to see
            raise DataError(f"{self.folder}: calling it raised {type(exc).__name__}: {exc}") from None
        if hasattr(source, "get_next"):
            return _reader_items(source), _length(source) is not None
        if not isinstance(source, Iterable) or isinstance(source, (dict, str, bytes)):
            raise DataError(f"{self.folder}: returned {type(source).__name__}; expected an iterable of "
                            "{input name: array} dicts or an object with get_next()")
        return iter(source), _length(source) is not None

    def _raw(self):
        items, sized = self._items()
        cap = None if sized or self.limit is not None else UNSIZED_CAP
        index = 0
        while True:
            try:
                item = next(items, None)
            except Exception as exc:  # the user's code raised while producing a sample
                raise DataError(f"{self.folder}: producing sample {index} raised {type(exc).__name__}: {exc}") from None
            if item is None:
                return
            if cap is not None and index >= cap:  # one past the cap: there were more
                self._cut_short[0] = True
                return
            name = f"sample {index}"
            if not isinstance(item, dict):
                raise DataError(f"{self.where(name)}: is a {type(item).__name__}; expected a dict "
                                "{input name: array}")
            extra = sorted(set(item) - {spec.name for spec in self.inputs})
            if extra:
                raise DataError(f"{self.where(name)}: keys {extra} are not model inputs "
                                f"({', '.join(spec.name for spec in self.inputs)})")
            yield name, self.where(name), item
            index += 1

    def listing_hash(self) -> str:
        """sha256 over the samples read (input names, dtypes, shapes and bytes)."""
        digest = hashlib.sha256()
        for _, feeds in self.samples():
            for name in sorted(feeds):
                array = np.ascontiguousarray(feeds[name])
                digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def reopen(self, limit: int | None) -> "FeedSource":
        other = FeedSource(self.data, self.inputs, limit, _replay=self._replay)
        other.state = self.state
        return other
