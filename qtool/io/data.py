"""Data folders become batches of model feeds, read in sorted order, never with pickle.

A `.npy` file holds one sample (or a batch along axis 0) of a single-input
model; a `.npz` file holds one sample of each input, keyed by input name; an
image (.png .jpg .jpeg .bmp) is one sample of a single-input model,
preprocessed as the recipe's `data.images` says (qtool.io.images). One folder
holds one kind: images or arrays, never both.

A folder with no data files of its own but sub-folders of them is a
class-folder layout (`DIR/<label>/*.png`): samples are named `<label>/<file>`
and labelled by their folder: its name when every folder name is an integer,
else its index among the sorted folder names.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from onnx import ModelProto, helper

from qtool.errors import DataError
from qtool.io.images import IMAGE_SUFFIXES, image_size_for, preprocess_image
from qtool.recipe.schema import ImageSpec

LABEL_FILES = ("labels.txt",)
# What numpy and zipfile raise on a damaged or hostile file: bad headers, short data,
# encrypted or oddly compressed members (RuntimeError, NotImplementedError, zlib.error),
# and shapes declared too large to allocate (MemoryError).
UNREADABLE = (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error, MemoryError)


@dataclass(frozen=True)
class InputSpec:
    """What the model declares for one input; dims are ints, names or None."""

    name: str
    dtype: np.dtype
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


@dataclass(frozen=True)
class Batch:
    files: tuple[str, ...]  # one entry per sample
    feeds: dict[str, np.ndarray]


def model_inputs(model: ModelProto) -> list[InputSpec]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _read_npy(path: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        names = ", ".join(spec.name for spec in inputs)
        raise DataError(f"{path}: a .npy file feeds a single-input model; this model has "
                        f"inputs {names}: use .npz files keyed by input name")
    return {inputs[0].name: _safe_load(path)}


def _read_npz(path: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: _checked_array(archive[key], path) for key in archive.files}
    except DataError:
        raise
    except (*UNREADABLE, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_reason(exc)})") from None
    expected = {spec.name for spec in inputs}
    if set(arrays) != expected:
        raise DataError(f"{path}: keys {sorted(arrays)} do not match the model inputs {sorted(expected)}")
    return arrays


def _safe_load(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable .npy file ({_reason(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected one array in a .npy file")
    return _checked_array(array, path)


def _checked_array(array: np.ndarray, path: Path) -> np.ndarray:
    if not isinstance(array, np.ndarray):  # an .npz member not named *.npy comes back as raw bytes
        raise DataError(f"{path}: holds a member that is not a .npy array; allowed: arrays keyed by input name")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: arrays of dtype {array.dtype} are not allowed; use numbers")
    return array


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


Reader = Callable[[Path, list], dict]
READERS: dict[str, Reader] = {".npy": _read_npy, ".npz": _read_npz}


def fit_to_input(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Add a missing batch axis and check rank, static dims and dtype against the model."""
    if array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis]
    if array.ndim != len(spec.shape):
        raise DataError(f"{path}: array of shape {list(array.shape)} does not fit input {spec.describe()}")
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(f"{path}: array of shape {list(array.shape)} does not fit input {spec.describe()}")
    if array.dtype != spec.dtype:
        if array.dtype.kind == "f" and spec.dtype.kind == "f" or array.dtype.kind in "biu" and spec.dtype.kind in "iu":
            array = array.astype(spec.dtype)
        else:
            raise DataError(f"{path}: dtype {array.dtype} does not fit input {spec.describe()}")
    return array


DATA_SUFFIXES = tuple(sorted((*READERS, *IMAGE_SUFFIXES)))


def _data_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in DATA_SUFFIXES and path.is_file())


def _class_folders(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """`DIR/<label>/*`: the files of every non-hidden sub-folder, and each sample's label."""
    subdirs = sorted((path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
                     key=lambda path: path.name)
    subdirs = [path for path in subdirs if _data_files(path)]
    numeric = all(path.name.isascii() and path.name.isdigit() for path in subdirs)
    files, labels = [], {}
    for index, subdir in enumerate(subdirs):
        for path in _data_files(subdir):
            files.append(path)
            labels[f"{subdir.name}/{path.name}"] = int(subdir.name) if numeric else index
    return files, labels


class DataFolder:
    """The data files of one folder (or of its class sub-folders), in sorted order, read lazily batch by batch."""

    def __init__(self, folder: str | Path, inputs: list[InputSpec], limit: int | None = None,
                 *, images: ImageSpec | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such data folder")
        self.inputs = inputs
        self.limit = limit
        self.files = _data_files(self.folder)
        # Labels taken from class sub-folders; None for a flat folder (labels.txt is read elsewhere).
        self.class_labels: dict[str, int] | None = None
        if not self.files:
            self.files, self.class_labels = _class_folders(self.folder)
        if not self.files:
            raise DataError(f"{self.folder}: no data files (nor class sub-folders of them); "
                            f"allowed: {', '.join(DATA_SUFFIXES)}")
        self.images = images
        self.image_size: tuple[int, int] | None = None
        if any(path.suffix.lower() in IMAGE_SUFFIXES for path in self.files):
            self._check_images()

    def _check_images(self) -> None:
        arrays = [path for path in self.files if path.suffix.lower() not in IMAGE_SUFFIXES]
        if arrays:
            raise DataError(f"{self.folder}: mixes image files and array files ({self.name(arrays[0])}); "
                            "keep one kind per folder")
        if self.images is None:
            raise DataError(f"{self.folder}: holds images; the recipe needs a data.images section "
                            "saying how to preprocess them (size, mean, std, ...)")
        if len(self.inputs) != 1:
            names = ", ".join(spec.name for spec in self.inputs)
            raise DataError(f"{self.folder}: image files feed a single-input model; this model has "
                            f"inputs {names}: use .npz files keyed by input name")
        spec = self.inputs[0]
        if len(spec.shape) != 4:
            raise DataError(f"{self.folder}: image files feed a 4-D input ({self.images.layout}); "
                            f"the model has {spec.describe()}")
        self.image_size = image_size_for(self.images, spec.shape)

    def name(self, path: Path) -> str:
        """A sample's name: its file name, or `<label>/<file>` in a class-folder layout."""
        return path.relative_to(self.folder).as_posix()

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return {self.inputs[0].name: preprocess_image(path, self.images, self.image_size)}
        return READERS[path.suffix.lower()](path, self.inputs)

    def listing_hash(self) -> str:
        """sha256 over names and contents: which data a report's figures came from."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(self.name(path).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def samples(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """One (file name, feeds with a batch axis) per file, fitted to the model."""
        seen = 0
        for path in self.files:
            if self.limit is not None and seen >= self.limit:
                return
            raw = self._read(path)
            feeds = {spec.name: fit_to_input(raw[spec.name], spec, path) for spec in self.inputs}
            counts = {array.shape[0] for array in feeds.values()}
            if len(counts) != 1:
                raise DataError(f"{path}: inputs disagree on the batch size: {sorted(counts)}")
            count = counts.pop()
            if self.limit is not None:
                count = min(count, self.limit - seen)
                feeds = {name: array[:count] for name, array in feeds.items()}
            seen += count
            yield self.name(path), feeds

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Samples grouped up to `batch_size`; a shape change starts a new batch."""
        pending: list[tuple[str, dict]] = []

        def flush() -> Batch:
            files = tuple(name for name, feeds in pending
                          for _ in range(next(iter(feeds.values())).shape[0]))
            feeds = {spec.name: np.concatenate([f[spec.name] for _, f in pending]) for spec in self.inputs}
            pending.clear()
            return Batch(files, feeds)

        count = 0
        for name, feeds in self.samples():
            shapes = {key: value.shape[1:] for key, value in feeds.items()}
            if pending and shapes != {k: v.shape[1:] for k, v in pending[0][1].items()}:
                yield flush()
                count = 0
            pending.append((name, feeds))
            count += next(iter(feeds.values())).shape[0]
            if count >= batch_size:
                yield flush()
                count = 0
        if pending:
            yield flush()


def read_labels(path: Path) -> dict[str, int]:
    """`file label` per line; blank lines and `#` comments ignored."""
    labels: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read labels: {_reason(exc)}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected `file label` with an integer label, got {line!r}")
        labels[parts[0]] = int(parts[1])
    return labels
