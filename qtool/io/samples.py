"""Samples fitted to a model's inputs, one at a time or stacked into runs: what every data source shares.

A source (qtool.io.data's files and folders, qtool.io.feeds' Python iterables) yields raw arrays per
sample, or several stacked; here they are checked against the model's declared inputs, split into
samples, converted to the inputs' dtypes, and grouped into runs along each input's batch axis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from onnx import ModelProto, TensorProto, helper

from qtool.errors import DataError
from qtool.io.batching import BatchAxis, InputSpec, batch_axes, per_run_limit, stack, stack_key, take
from qtool.io.streams import StreamState


@dataclass(frozen=True)
class Batch:
    files: tuple[str, ...]  # one entry per sample
    feeds: dict[str, np.ndarray]
    axes: dict[str, BatchAxis] | None = None  # None: every input batched along axis 0
    starts: tuple[bool, ...] | None = None  # per sample: it begins a stream (None: no streams, no state)

    @property
    def count(self) -> int:
        return len(self.files)

    def part(self, start: int, stop: int) -> "Batch":
        """Samples start..stop (views of the feeds)."""
        axes = self.axes or {name: BatchAxis(0, "") for name in self.feeds}
        starts = self.starts[start:stop] if self.starts is not None else None
        return Batch(self.files[start:stop], take(self.feeds, axes, start, stop), self.axes, starts)


# ONNX element types of integer and bool tensors (outputs scored by exact match, not cosine or SQNR)
INTEGER_ELEMENTS = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}


def integer_outputs(model: ModelProto) -> list[bool]:
    """Per graph output, in order: whether its declared element type is integer or bool."""
    return [value.type.tensor_type.elem_type in INTEGER_ELEMENTS for value in model.graph.output]


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
        ) if tensor.HasField("shape") else None
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def check_shape(array: np.ndarray, spec: InputSpec, where, axis: int | None = 0) -> np.ndarray:
    """The array with a missing batch axis added; rank and static dims (but the batch axis) checked.
    Without a batch axis, one more leading axis means values stacked per sample."""
    if spec.shape is None:
        return array
    rank = len(spec.shape)
    if axis is not None and array.ndim == rank - 1:
        array = np.expand_dims(array, axis)
    stacked = axis is None and array.ndim == rank + 1 and rank >= 0
    own = array.shape[1:] if stacked else array.shape
    if len(own) != rank or any(isinstance(want, int) and want > 0 and got != want and i != axis
                               for i, (got, want) in enumerate(zip(own, spec.shape))):
        raise DataError(f"{where}: array of shape {list(array.shape)} does not fit input {spec.describe()}")
    return array


def convert(array: np.ndarray, spec: InputSpec, where) -> np.ndarray:
    """The array in the input's dtype (float to float, integer to integer); NaN/Inf refused."""
    if array.dtype != spec.dtype:
        if array.dtype.kind == "f" and spec.dtype.kind == "f" or array.dtype.kind in "biu" and spec.dtype.kind in "iu":
            array = array.astype(spec.dtype)
        else:
            raise DataError(f"{where}: dtype {array.dtype} does not fit input {spec.describe()}")
    else:
        array = np.asarray(array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{where}: input {spec.name} holds NaN or Inf values; data must be finite numbers")
    return array


def fit_to_input(array: np.ndarray, spec: InputSpec, path, axis: int | None = 0) -> np.ndarray:
    """Add a missing batch axis and check rank, static dims and dtype against the model."""
    return convert(check_shape(array, spec, path, axis), spec, path)


class DataSource:
    """Samples fitted to the model's inputs, one by one (`samples`) or in runs (`batches`).

    Subclasses give `_raw()`: (sample name, where for messages, {input: array holding one sample
    or several stacked}), `total`, `listing_hash()` and `reopen(limit)`. With `state` (a stateful
    model, qtool.io.streams) each raw entry is one stream whose samples are its chunks in order:
    state inputs the entry lacks get the first state, and runs hold one chunk each.
    """

    folder: Path | str  # where the data came from, as the report shows it
    class_labels: dict[str, int] | None = None
    total: int | None = None  # samples expected, when known
    state: StreamState | None = None
    mask_input: str | None = None  # the input whose zeros mark padding (text data's attention mask)
    notes: tuple[str, ...] = ()  # what reading did that the files do not show (resampled, files passed over)

    def __init__(self, inputs: list[InputSpec], limit: int | None):
        self.inputs = inputs
        self.limit = limit
        self.axes = batch_axes(inputs)

    def _raw(self) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """A sample's place for messages (its file)."""
        return f"{self.folder}/{name}" if isinstance(self.folder, Path) and name else str(self.folder)

    def samples(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """One (name, feeds for one sample) at a time, fitted to the model; stacked files split."""
        for name, _, sample in self._samples():
            yield name, sample

    def _samples(self) -> Iterator[tuple[str, bool, dict[str, np.ndarray]]]:
        """(name, begins a stream: the first sample of its entry, feeds) per sample."""
        seen = 0
        for name, where, raw in self._raw():
            if self.limit is not None and seen >= self.limit:
                return
            if self.state is not None:
                raw = {**self.state.initial, **raw}
            missing = [spec.name for spec in self.inputs if spec.name not in raw]
            if missing:
                raise DataError(f"{where}: no array for input {', '.join(missing)}; "
                                f"the model's inputs: {', '.join(s.name for s in self.inputs)}")
            arrays = {spec.name: check_shape(_array(raw[spec.name], where), spec, self._where(where, spec.name),
                                             self.axes[spec.name].axis)
                      for spec in self.inputs}
            count = self._count(arrays, where)
            for index in range(count):
                if self.limit is not None and seen >= self.limit:
                    return
                sample = {spec.name: convert(self._one(arrays[spec.name], spec, index, count), spec, where)
                          for spec in self.inputs}
                seen += 1
                yield name, index == 0, sample

    def _count(self, arrays: dict[str, np.ndarray], where: str) -> int:
        counts = {}
        for spec in self.inputs:
            if self._carried(spec.name):  # one state for the whole entry, replaced as the stream runs
                continue
            axis = self.axes[spec.name].axis
            array = arrays[spec.name]
            if axis is not None and spec.shape is not None:
                counts[spec.name] = array.shape[axis]
            elif spec.shape is not None and array.ndim == len(spec.shape) + 1:
                counts[spec.name] = array.shape[0]
        if len(set(counts.values())) > 1:
            found = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise DataError(f"{where}: inputs disagree on the number of samples ({found})")
        return next(iter(counts.values()), 1)

    def _one(self, array: np.ndarray, spec: InputSpec, index: int, count: int) -> np.ndarray:
        """Sample `index` of an input's array (a view): a slice along the batch axis, or one entry
        of values stacked per sample, or the array itself when it holds one value for all."""
        axis = self.axes[spec.name].axis
        if spec.shape is None or self._carried(spec.name):
            return array
        if axis is not None:
            return array if count == 1 else array[(slice(None),) * axis + (slice(index, index + 1),)]
        return array[index] if array.ndim == len(spec.shape) + 1 else array

    def _where(self, where: str, name: str) -> str:
        """A sample's place for messages; a state input's names the recipe key that made it one."""
        return f"{where} (state input {name}: data.state.carry in {self.state.where})" if self._carried(name) else where

    def _carried(self, name: str) -> bool:
        return self.state is not None and name in self.state.carry

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Runs of up to `batch_size` samples (one where the model fixes its batch at 1); samples
        whose shapes or unbatched inputs differ start a new run."""
        if self.state is not None:  # a stream's chunks run in order, one at a time
            for name, start, sample in self._samples():
                yield Batch((name,), sample, self.axes, (start,))
            return
        limit = per_run_limit(self.axes)
        size = max(1, min(batch_size, limit) if limit else batch_size)
        names: list[str] = []
        pending: list[dict[str, np.ndarray]] = []
        key = None
        for name, sample in self.samples():
            sample_key = stack_key(sample, self.axes) if size > 1 else None
            if pending and sample_key != key:
                yield Batch(tuple(names), stack(pending, self.axes), self.axes)
                names, pending = [], []
            key = sample_key
            names.append(name)
            pending.append(sample)
            if len(pending) >= size:
                yield Batch(tuple(names), stack(pending, self.axes), self.axes)
                names, pending = [], []
        if pending:
            yield Batch(tuple(names), stack(pending, self.axes), self.axes)

    def with_inputs(self, inputs: list[InputSpec]) -> "DataSource":
        """The same data fed to a model whose inputs declare other shapes (batch axes)."""
        other = copy.copy(self)
        other.inputs, other.axes = inputs, batch_axes(inputs)
        return other

    def batching(self) -> dict[str, dict]:
        """Which inputs are stacked along which axis, and why (for the report)."""
        return {name: axis.as_dict() for name, axis in self.axes.items()}

    def listing_hash(self) -> str:
        raise NotImplementedError

    def reopen(self, limit: int | None) -> "DataSource":
        raise NotImplementedError


def _array(value, where: str) -> np.ndarray:
    """A feed value as an array of numbers (Python loaders may hand back lists or numpy scalars)."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: arrays of dtype {array.dtype} are not allowed; use numbers")
    return array


LABEL_FILES = ("labels.txt",)


def listed_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself when it is a file, else the folder's files with one of `suffixes` (lower case) but
    a labels file, sorted."""
    if path.is_file():
        return [path]
    return sorted(child for child in path.iterdir()
                  if child.suffix.lower() in suffixes and child.name not in LABEL_FILES and child.is_file())
