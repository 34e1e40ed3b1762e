"""Weights that stay on disk: the tensors of a model past protobuf's 2 GB limit, never held twice.

Such a model is loaded without its external data. Its tensors point, by absolute path, into the
input's data files, or into spill files (the weights qtool computes) of one work folder per process.
numpy reads a tensor through a copy-on-write memory map, one tensor at a time. ONNX Runtime gets
a model file written into the work folder and maps the data itself; the input's data files are
copied there the first time a session needs them (by the kernel, not through memory; a hard link
would be refused by onnx.checker as a possible attack). What a `scratch()` block puts into the
folder (copies, spill files) is removed when the block ends, also on Ctrl-C or SIGTERM (raised as an
exception by the CLI); the folder itself when the outermost block ends, or else when the process
exits. A model whose data the block wrote must be read back (`into_memory`) to outlive it; every
use case (qtool.api, qtool.search.api) is one block. Measured on a 0.40 GB model (onnxruntime
1.32): a session over such a file holds each weight once (mapped, or its prepacked copy once
packed); one over bytes, `add_external_initializers` or in-memory files copies every weight first;
data files reached through a symbolic link are refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from onnx import ModelProto, TensorProto, external_data_helper, helper, numpy_helper

from qtool.io.artifacts import signals_deferred

CHUNK_BYTES = 16 << 20  # copying tensor data between files: the most held in memory at once
SPILL_MIN_BYTES = 1024  # in-memory tensors from here on go to disk (as onnx's save_model size_threshold)
# Types numpy maps as they are stored (4-bit, 8-bit float and bfloat16 data is decoded by onnx instead).
MAPPABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
            TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
            TensorProto.UINT64, TensorProto.BOOL}
_WORK: list[tempfile.TemporaryDirectory] = []  # the default folder: created on first use


@dataclass(eq=False)  # scopes are told apart by identity
class _Scope:
    folder: Path | None  # the work folder inside the block (None: the one around it)
    files: list[str] = field(default_factory=list)  # written inside the block: removed when it ends


_SCOPES: list[_Scope] = []


def work_folder() -> Path:
    """This process's folder for data files and the model files ONNX Runtime reads: the innermost
    `scratch(folder)` block's, else a temporary folder of its own (removed when the outermost block
    ends, or at exit)."""
    for scope in reversed(_SCOPES):
        if scope.folder is not None:
            return scope.folder
    if not _WORK:
        _WORK.append(tempfile.TemporaryDirectory(prefix="qtool-weights-"))
    return Path(_WORK[0].name)


def _new_file(prefix: str, suffix: str) -> Path:
    """A new file name in the work folder, owned by the innermost scratch block (named to it before it exists)."""
    path = work_folder() / f"{prefix}-{uuid.uuid4().hex}{suffix}"
    if _SCOPES:
        _SCOPES[-1].files.append(str(path))
    return path


@contextlib.contextmanager
def scratch(folder: Path | None = None) -> Iterator[None]:
    """A block whose work files (input copies, spill files, model files for ONNX Runtime) are removed
    when it ends, however it ends; `folder`: put them there (a folder of the caller's, which it
    removes itself) instead of the work folder around it. The outermost block also removes the
    default work folder if it made it. Models whose on-disk data the block wrote cannot be read after it."""
    scope = _Scope(Path(folder) if folder is not None else None)
    made_here = not _WORK
    _SCOPES.append(scope)
    try:
        yield
    finally:
        with signals_deferred():  # Ctrl-C twice does not leave half of it behind
            _SCOPES.remove(scope)
            gone = set(scope.files)
            for key in [key for key, copy in _copies.items() if copy in gone]:
                del _copies[key]
            for path in scope.files:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if not _SCOPES and made_here and _WORK:
                _WORK.pop().cleanup()


Fn = TypeVar("Fn", bound=Callable)


def in_scratch(function: Fn) -> Fn:
    """`function` run inside a `scratch()` block (the use cases: nothing they write to disk outlives them)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with scratch():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def on_disk(tensor: TensorProto) -> bool:
    """Whether the tensor's data sits in a file qtool reads on demand (see keep_on_disk, spill)."""
    return tensor.data_location == TensorProto.EXTERNAL and os.path.isabs(_info(tensor).location)


def keep_on_disk(model: ModelProto, folder: Path) -> None:
    """Point each external tensor of a model loaded without its data (locations relative to `folder`,
    checked to stay inside it) at its data file by absolute path.

    A tensor whose data would end past its file, or whose length does not match its type and
    dims, is a ValueError naming it (as onnx's loader checks).
    """
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        _check_bounds(tensor, folder)
        entry = next(e for e in tensor.external_data if e.key == "location")
        entry.value = os.path.abspath(folder / entry.value)


def _check_bounds(tensor: TensorProto, folder: Path) -> None:
    info = _info(tensor)
    available = os.path.getsize(folder / info.location) - int(info.offset or 0)
    length = available if info.length is None else int(info.length)
    if length > available or int(info.offset or 0) < 0:
        raise ValueError(f"External data length ({length}) exceeds available data ({max(available, 0)} bytes "
                         f"from offset {info.offset or 0}) for tensor {tensor.name!r}")
    if tensor.data_type in MAPPABLE:
        expected = int(np.prod(tensor.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if length != expected:
            raise ValueError(f"External data length ({length}) of tensor {tensor.name!r} does not match its "
                             f"type and dims ({expected} bytes)")


# (work folder, path, inode, size, mtime) of an input data file -> its copy in that work folder
_copies: dict[tuple, str] = {}


def _work_copy(source: str) -> str:
    """`source` if it is in the work folder, else its copy there (made once per version of the file
    and scratch block)."""
    folder = str(work_folder())
    if os.path.dirname(source) == folder:
        return source
    stat = os.stat(source)
    key = (folder, source, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _copies:
        target = _new_file("input", ".data")
        shutil.copyfile(source, target)  # copy_file_range/sendfile on Linux
        _copies[key] = str(target)
    return _copies[key]


def tensor_array(tensor: TensorProto) -> np.ndarray:
    """The tensor's values as numpy_helper.to_array gives them; data on disk is memory-mapped
    copy-on-write (read when touched, writable, the file never changed)."""
    if not on_disk(tensor):
        return numpy_helper.to_array(tensor)
    info = _info(tensor)
    shape = tuple(tensor.dims)
    if tensor.data_type in MAPPABLE and int(np.prod(shape)) > 0:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        return np.memmap(info.location, dtype=dtype, mode="c", offset=info.offset, shape=shape).view(np.ndarray)
    return numpy_helper.to_array(_loaded(tensor))


def _loaded(tensor: TensorProto) -> TensorProto:
    """A copy of an on-disk tensor with its data in memory."""
    copy = TensorProto()
    copy.CopyFrom(tensor)
    location = next(e for e in copy.external_data if e.key == "location")
    folder, location.value = os.path.split(location.value)
    external_data_helper.load_external_data_for_tensor(copy, folder)
    copy.ClearField("data_location")  # as numpy_helper.from_array leaves it
    return copy


def _info(tensor: TensorProto) -> external_data_helper.ExternalDataInfo:
    return external_data_helper.ExternalDataInfo(tensor)


def on_disk_bytes(model: ModelProto) -> int:
    """Bytes of tensor data the model keeps in external files."""
    return sum(_length(t) for t in external_data_helper._get_all_tensors(model)
               if t.data_location == TensorProto.EXTERNAL)


def _length(tensor: TensorProto) -> int:
    info = _info(tensor)
    if info.length is not None:
        return int(info.length)
    return os.path.getsize(info.location) - int(info.offset or 0) if os.path.isabs(info.location) else 0


class SpillFile:
    """A new work-folder file that tensors are appended to, one at a time."""

    def __init__(self) -> None:
        self.path = _new_file("spill", ".data")
        self.path.touch()

    def write(self, tensor: TensorProto, data: bytes | memoryview) -> TensorProto:
        """Append `data` and point `tensor` (its raw_data cleared) at it; returns `tensor`."""
        with open(self.path, "ab") as handle:
            offset = handle.tell()
            handle.write(data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", str(self.path)), ("offset", offset), ("length", len(data))):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def initializer(self, array: np.ndarray, name: str) -> TensorProto:
        """numpy_helper.from_array(array, name), its data in this file when it is a mappable type of at
        least SPILL_MIN_BYTES (never held in a protobuf, whose arena would keep it after it is cleared)."""
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype) if array.dtype.kind in "biuf" else None
        if data_type not in MAPPABLE or array.nbytes < SPILL_MIN_BYTES:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto(name=name, data_type=data_type, dims=array.shape)
        return self.write(tensor, memoryview(np.ascontiguousarray(array, array.dtype.newbyteorder("<"))).cast("B"))


def spill(model: ModelProto) -> None:
    """Move the data of every initializer holding at least SPILL_MIN_BYTES in memory into a new
    file of the work folder, one tensor at a time."""
    tensors = [t for t in external_data_helper._get_initializer_tensors(model)
               if t.HasField("raw_data") and len(t.raw_data) >= SPILL_MIN_BYTES]
    if tensors:
        spill_file = SpillFile()
        for tensor in tensors:
            spill_file.write(tensor, tensor.raw_data)


def runtime_file(model: ModelProto) -> Path:
    """The model written into the work folder for ONNX Runtime, its on-disk tensors located by file
    name there (in-memory ones are spilled first: `model` changes only in where its data lives;
    input data files are copied in). The caller deletes the file."""
    spill(model)
    header = ModelProto()
    header.CopyFrom(model)  # small: no tensor holds more than SPILL_MIN_BYTES in memory now
    for tensor in external_data_helper._get_all_tensors(header):
        if on_disk(tensor):
            entry = next(e for e in tensor.external_data if e.key == "location")
            entry.value = os.path.basename(_work_copy(entry.value))
    path = _new_file("model", ".onnx")
    path.write_bytes(header.SerializeToString())
    return path


def save_with_external_data(model: ModelProto, path: Path, location: str, data_path: Path | None = None) -> None:
    """Write `model` to `path`, the data of its on-disk tensors and of in-memory initializers of at least
    1 KB (as onnx.save_model(..., size_threshold=1024) counts) appended to `location` beside it (written
    at `data_path` when given: a staging name the caller renames to `location`).

    Data is copied file to file in chunks of CHUNK_BYTES; `model` itself is not changed.
    """
    header = ModelProto()
    header.CopyFrom(model)
    tensors = [*((t, True) for t in external_data_helper._get_initializer_tensors(header)),
               *((t, False) for t in external_data_helper._get_attribute_tensors(header))]
    with open(data_path or path.parent / location, "wb") as out:
        for tensor, initializer in tensors:
            if on_disk(tensor):
                offset = out.tell()
                for chunk in _chunks(tensor):
                    out.write(chunk)
            elif initializer and tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= 1024:
                offset = out.tell()
                out.write(tensor.raw_data)
            else:
                continue
            length = out.tell() - offset
            tensor.raw_data = b"\0"  # set_external_data asks for the field; cleared below
            external_data_helper.set_external_data(tensor, location, offset, length)
            tensor.ClearField("raw_data")
    path.write_bytes(header.SerializeToString())


def content_sha256(model: ModelProto) -> str:
    """sha256 (hex) of what a model is: its graph and every tensor's bytes, wherever they are kept.

    The same model gives the same digest with its weights in memory, in spill files or in copies at
    any path (its serialized form would name those paths). Each tensor counts as its fields without
    its data, then its data bytes (raw_data, or read from disk CHUNK_BYTES at a time); the rest of the
    model (nodes, I/O, opsets, metadata) as one protobuf. Memory: the model without its top-level
    initializers, plus one tensor's raw_data or one chunk.
    """
    digest = hashlib.sha256()
    header = _without(model, "graph")
    header.graph.CopyFrom(_without(model.graph, "initializer"))
    for tensor in external_data_helper._get_all_tensors(header):  # attribute tensors, subgraphs' initializers
        _hash_tensor(digest, tensor)
        for name in _DATA_FIELDS:
            tensor.ClearField(name)
    _framed(digest, header.SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


_DATA_FIELDS = ("raw_data", "external_data", "data_location")


def _without(message, *skipped: str):
    """A copy of a protobuf message without some of its fields (which are never copied)."""
    copy = type(message)()
    for descriptor in message.DESCRIPTOR.fields:  # not ListFields: it would read the skipped ones too
        name = descriptor.name
        if name in skipped:
            continue
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else \
            descriptor.label == descriptor.LABEL_REPEATED  # protobuf before 5.29
        if repeated:
            getattr(copy, name).extend(getattr(message, name))
        elif message.HasField(name):
            if descriptor.type == descriptor.TYPE_MESSAGE:
                getattr(copy, name).CopyFrom(getattr(message, name))
            else:
                setattr(copy, name, getattr(message, name))
    return copy


def _framed(digest, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _hash_tensor(digest, tensor: TensorProto) -> None:
    """The tensor's fields but its data, framed; then its data, framed the same in memory and on disk."""
    _framed(digest, _without(tensor, *_DATA_FIELDS).SerializeToString(deterministic=True))
    if on_disk(tensor):
        digest.update(_length(tensor).to_bytes(8, "little"))
        for chunk in _chunks(tensor):
            digest.update(chunk)
    elif tensor.data_location == TensorProto.EXTERNAL:  # a relative location, resolved nowhere: its entries
        _framed(digest, b"".join(f"{e.key}={e.value}\0".encode() for e in tensor.external_data))
    else:
        _framed(digest, tensor.raw_data)


def _chunks(tensor: TensorProto) -> Iterator[bytes]:
    """An on-disk tensor's data, CHUNK_BYTES at a time; an OSError if its file ends before it does."""
    info = _info(tensor)
    with open(info.location, "rb") as source:
        source.seek(int(info.offset or 0))
        left = _length(tensor)
        while left > 0:
            chunk = source.read(min(left, CHUNK_BYTES))
            if not chunk:
                raise OSError(f"{info.location}: ends before tensor {tensor.name!r}'s data")
            yield chunk
            left -= len(chunk)


def into_memory(model: ModelProto) -> ModelProto:
    """`model` with the data of its on-disk tensors read back into it (for callers that keep the model
    past this process's work folder); returns the same object."""
    for tensor in external_data_helper._get_all_tensors(model):
        if on_disk(tensor):
            tensor.CopyFrom(_loaded(tensor))
    return model
