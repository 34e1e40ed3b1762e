"""Data files and folders become samples fitted to the model's inputs, read in sorted order, never with pickle.

`--data` may name one file or a folder. A file: a `.npy` (a single-input model) or `.npz` (keyed
by input name) holding one sample or many stacked along each input's batch axis. A folder holds
one kind:
- such files, or images (.png .jpg .jpeg .bmp) of a single-input model, preprocessed as the
  recipe's `data.images` says (qtool.io.images);
- ONNX test-data folders `test_data_set_*/input_N.pb` (TensorProto files), one sample each;
- one folder per sample holding `<input_name>.npy` for every input;
- class folders `DIR/<label>/*`: samples named `<label>/<file>` and labelled by their folder: its
  name when every folder name is an integer, else its index among the sorted folder names.
Samples are grouped into runs along each input's batch axis (qtool.io.batching).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from qtool.errors import DataError
from qtool.io.arrays import npz_shapes, read_npy, read_npz, read_pb, reason
from qtool.io.batching import InputSpec
from qtool.io.samples import Batch, DataSource, fit_to_input, model_inputs
from qtool.io.images import IMAGE_SUFFIXES, image_size_for, preprocess_image
from qtool.recipe.inputs import ImageSpec

__all__ = ["Batch", "DataFolder", "DataSource", "InputSpec", "fit_to_input", "Labels", "model_inputs", "read_labels"]

LABEL_FILES = ("labels.txt",)
ARRAY_SUFFIXES = (".npy", ".npz")
DATA_SUFFIXES = tuple(sorted((*ARRAY_SUFFIXES, *IMAGE_SUFFIXES)))
TEST_DATA_SET = re.compile(r"test_data_set_\d+")
PB_INPUT = re.compile(r"input_(\d+)\.pb")


def file_digest(path: Path) -> bytes:
    """sha256 of a file, read in chunks: memory does not grow with its size."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def _data_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in DATA_SUFFIXES and path.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted((path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
                  key=lambda path: path.name)


class DataFolder(DataSource):
    """The samples of one data file or folder (see the module's docstring), read lazily."""

    def __init__(self, folder: str | Path, inputs: list[InputSpec], limit: int | None = None,
                 *, images: ImageSpec | None = None):
        super().__init__(inputs, limit)
        self.folder = Path(folder)
        self.images = images
        self.image_size: tuple[int, int] | None = None
        # (sample name, files): a file, an ONNX test-data folder's input_N.pb or a folder's <input>.npy
        self.entries: list[tuple[str, tuple[Path, ...]]] = []
        if self.folder.is_file():
            if self.folder.suffix.lower() not in ARRAY_SUFFIXES:
                raise DataError(f"{self.folder}: a data file must be .npy or .npz "
                                f"(or give a folder of samples); allowed: {', '.join(ARRAY_SUFFIXES)}")
            self.entries = [("", (self.folder,))]
            self.kind = "file"
        elif not self.folder.is_dir():
            raise DataError(f"{self.folder}: no such data folder or file")
        else:
            self._scan()
        self.total = self._total()

    def _scan(self) -> None:
        files = _data_files(self.folder)
        self.kind = "files"
        if files:
            self.entries = [(path.name, (path,)) for path in files]
        else:
            subdirs = _subfolders(self.folder)
            self.entries = self._test_data_sets(subdirs) or self._sample_folders(subdirs) or self._classes(subdirs)
        if not self.entries:
            raise DataError(f"{self.folder}: no data files (nor test_data_set_*/input_N.pb, per-sample folders "
                            f"of <input>.npy or class sub-folders); allowed: {', '.join(DATA_SUFFIXES)}")
        if any(paths[0].suffix.lower() in IMAGE_SUFFIXES for _, paths in self.entries):
            self._check_images()

    def _test_data_sets(self, subdirs: list[Path]) -> list:
        sets = [path for path in subdirs if TEST_DATA_SET.fullmatch(path.name)]
        if not sets:
            return []
        self.kind = "onnx test data"
        entries = []
        for subdir in sorted(sets, key=lambda path: int(path.name.rsplit("_", 1)[1])):
            pbs = sorted((p for p in subdir.iterdir() if PB_INPUT.fullmatch(p.name)),
                         key=lambda p: int(PB_INPUT.fullmatch(p.name).group(1)))
            if pbs:
                entries.append((subdir.name, tuple(pbs)))
        return entries

    def _sample_folders(self, subdirs: list[Path]) -> list:
        names = {f"{spec.name}.npy" for spec in self.inputs}
        entries = []
        for subdir in subdirs:
            found = {path.name for path in _data_files(subdir)}
            if not found or not found <= names:
                return []
            entries.append((subdir.name, tuple(subdir / name for name in sorted(found))))
        if entries:
            self.kind = "sample folders"
        return entries

    def _classes(self, subdirs: list[Path]) -> list:
        subdirs = [path for path in subdirs if _data_files(path)]
        numeric = all(path.name.isascii() and path.name.isdigit() for path in subdirs)
        entries, self.class_labels = [], {}
        for index, subdir in enumerate(subdirs):
            for path in _data_files(subdir):
                name = f"{subdir.name}/{path.name}"
                entries.append((name, (path,)))
                self.class_labels[name] = int(subdir.name) if numeric else index
        if not entries:
            self.class_labels = None
        self.kind = "class folders"
        return entries

    def _check_images(self) -> None:
        arrays = [name for name, paths in self.entries if paths[0].suffix.lower() not in IMAGE_SUFFIXES]
        if arrays:
            raise DataError(f"{self.folder}: mixes image files and array files ({arrays[0]}); "
                            "keep one kind per folder")
        if self.images is None:
            raise DataError(f"{self.folder}: holds images; the recipe needs a data.images section "
                            "saying how to preprocess them (size, mean, std, ...)")
        if len(self.inputs) != 1:
            names = ", ".join(spec.name for spec in self.inputs)
            raise DataError(f"{self.folder}: image files feed a single-input model; this model has "
                            f"inputs {names}: use .npz files keyed by input name")
        spec = self.inputs[0]
        if spec.shape is None or len(spec.shape) != 4:
            raise DataError(f"{self.folder}: image files feed a 4-D input ({self.images.layout}); "
                            f"the model has {spec.describe()}")
        self.image_size = image_size_for(self.images, spec.shape)

    def _total(self) -> int | None:
        if self.kind == "file":
            shapes = npz_shapes(self.folder) if self.folder.suffix.lower() == ".npz" else {
                spec.name: read_npy(self.folder).shape for spec in self.inputs[:1]}
            counts = {self._stacked(spec, shapes[spec.name]) for spec in self.inputs if spec.name in shapes}
            count = counts.pop() if len(counts) == 1 else None
            return min(count, self.limit) if count and self.limit else count or self.limit
        return min(len(self.entries), self.limit) if self.limit else len(self.entries)

    def _stacked(self, spec: InputSpec, shape: tuple) -> int:
        """How many samples an array of this shape holds for this input."""
        axis = self.axes[spec.name].axis
        if spec.shape is None:
            return 1
        if axis is not None:
            return shape[axis] if len(shape) == len(spec.shape) else 1
        return shape[0] if len(shape) == len(spec.shape) + 1 else 1

    @property
    def files(self) -> list[str]:
        """Sample names (file names; per-sample folders' names)."""
        return [name or self.folder.name for name, _ in self.entries]

    def name(self, path: Path) -> str:
        """A file's name relative to the folder (`<label>/<file>` in a class-folder layout)."""
        return path.relative_to(self.folder).as_posix()

    def where(self, name: str) -> str:
        return str(self.folder / name) if name and self.kind != "file" else str(self.folder)

    def _raw(self):
        for name, paths in self.entries:
            where = str(paths[0]) if len(paths) == 1 else str(paths[0].parent)
            yield name or self.folder.name, where, self._read(paths)

    def _read(self, paths: tuple[Path, ...]) -> dict[str, np.ndarray]:
        first = paths[0]
        suffix = first.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return {self.inputs[0].name: preprocess_image(first, self.images, self.image_size)}
        if suffix == ".pb":
            return self._read_pbs(paths)
        if len(paths) > 1 or self.kind == "sample folders":
            return {path.stem: read_npy(path) for path in paths}
        fed = [spec for spec in self.inputs if self.state is None or spec.name not in self.state.carry]
        if suffix == ".npz":
            arrays = read_npz(first)
            expected = {spec.name for spec in fed}
            if not expected <= set(arrays) <= {spec.name for spec in self.inputs}:  # state inputs: optional
                raise DataError(f"{first}: keys {sorted(arrays)} do not match the model inputs {sorted(expected)}")
            return arrays
        if len(fed) != 1:
            names = ", ".join(spec.name for spec in fed)
            raise DataError(f"{first}: a .npy file feeds a single-input model; this model has "
                            f"inputs {names}: use .npz files keyed by input name, or one folder per "
                            "sample holding <input_name>.npy (state inputs: name them in data.state)")
        return {fed[0].name: read_npy(first)}

    def _read_pbs(self, paths: tuple[Path, ...]) -> dict[str, np.ndarray]:
        tensors = [read_pb(path) for path in paths]
        names = {spec.name for spec in self.inputs}
        if all(name in names for name, _ in tensors):
            return {name: array for name, array in tensors}
        arrays = {}
        for path, (_, array) in zip(paths, tensors):
            index = int(PB_INPUT.fullmatch(path.name).group(1))
            if index >= len(self.inputs):
                raise DataError(f"{path}: the model has {len(self.inputs)} input(s); input_N.pb counts from 0")
            arrays[self.inputs[index].name] = array
        return arrays

    def listing_hash(self) -> str:
        """sha256 over names and contents (streamed): which data a report's figures came from."""
        digest = hashlib.sha256()
        for name, paths in self.entries:
            for path in paths:
                label = self.name(path) if path != self.folder else path.name
                digest.update(label.encode() + b"\0" + file_digest(path))
        return digest.hexdigest()

    def reopen(self, limit: int | None) -> "DataFolder":
        other = DataFolder(self.folder, self.inputs, limit, images=self.images)
        other.state = self.state
        return other


class Labels(dict):
    """File name -> class index (a dict), remembering the file and line each came from, so that a
    label the model cannot produce is refused naming its line (`where`)."""

    def __init__(self, source: Path):
        super().__init__()
        self.source = source
        self.lines: dict[str, int] = {}

    def where(self, name: str) -> str:
        """`labels.txt:LINE` of `name`'s label."""
        return f"{self.source}:{self.lines[name]}" if name in self.lines else str(self.source)


def read_labels(path: Path) -> Labels:
    """`file label` per line; blank lines and `#` comments ignored. Raises DataError naming the line
    of a malformed one, and of a file labelled twice with different classes (which would be a guess)."""
    labels = Labels(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read labels: {reason(exc)}") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected `file label` with an integer label, got {line!r}")
        name, label = parts[0], int(parts[1])
        if name in labels and labels[name] != label:
            raise DataError(f"{path}:{number}: {name} is labelled {label} here but {labels[name]} on line "
                            f"{labels.lines[name]}: one label a file")
        labels[name] = label
        labels.lines.setdefault(name, number)
    return labels
