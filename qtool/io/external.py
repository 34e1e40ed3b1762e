"""Weights that stay on disk: the tensors of a model past protobuf's 2 GB limit, never held twice.

Such a model is loaded without its external data. Its tensors point, by absolute path, into the
input's data files, or into spill files (the weights qtool computes) of one work folder per process.
numpy reads a tensor through a copy-on-write memory map, one tensor at a time. ONNX Runtime gets
a model file written into the work folder and maps the data itself; the input's data files are
copied there the first time a session needs them (by the kernel, not through memory; a hard link
would be refused by onnx.checker as a possible attack). The folder holds those copies and the
integer weights of every quantized model built until the process exits. Measured on a 0.40 GB model
(onnxruntime 1.32): a session over such a file holds each weight once (mapped, or its prepacked
copy once packed); one over bytes, `add_external_initializers` or in-memory files copies every
weight first; data files reached through a symbolic link are refused.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, external_data_helper, helper, numpy_helper

CHUNK_BYTES = 16 << 20  # copying tensor data between files: the most held in memory at once
SPILL_MIN_BYTES = 1024  # in-memory tensors from here on go to disk (as onnx's save_model size_threshold)
# Types numpy maps as they are stored (4-bit, 8-bit float and bfloat16 data is decoded by onnx instead).
MAPPABLE = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
            TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
            TensorProto.UINT64, TensorProto.BOOL}
_WORK: list[tempfile.TemporaryDirectory] = []  # created on first use, removed when the process exits


def work_folder() -> Path:
    """This process's folder for data files and the model files ONNX Runtime reads (removed at exit)."""
    if not _WORK:
        _WORK.append(tempfile.TemporaryDirectory(prefix="qtool-weights-"))
    return Path(_WORK[0].name)


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


_copies: dict[tuple, str] = {}  # (path, inode, size, mtime) of an input data file -> its copy in the work folder


def _work_copy(source: str) -> str:
    """`source` if it is in the work folder, else its copy there (made once per version of the file)."""
    if os.path.dirname(source) == str(work_folder()):
        return source
    stat = os.stat(source)
    key = (source, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _copies:
        target = work_folder() / f"input-{uuid.uuid4().hex}.data"
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
        self.path = work_folder() / f"spill-{uuid.uuid4().hex}.data"
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
    path = work_folder() / f"model-{uuid.uuid4().hex}.onnx"
    path.write_bytes(header.SerializeToString())
    return path


def save_with_external_data(model: ModelProto, path: Path, location: str) -> None:
    """Write `model` to `path`, the data of its on-disk tensors and of in-memory initializers of at least
    1 KB (as onnx.save_model(..., size_threshold=1024) counts) appended to `location` beside it.

    Data is copied file to file in chunks of CHUNK_BYTES; `model` itself is not changed.
    """
    header = ModelProto()
    header.CopyFrom(model)
    tensors = [*((t, True) for t in external_data_helper._get_initializer_tensors(header)),
               *((t, False) for t in external_data_helper._get_attribute_tensors(header))]
    with open(path.parent / location, "wb") as out:
        for tensor, initializer in tensors:
            if on_disk(tensor):
                info, offset = _info(tensor), out.tell()
                with open(info.location, "rb") as source:
                    source.seek(int(info.offset or 0))
                    left = _length(tensor)
                    while left > 0:
                        chunk = source.read(min(left, CHUNK_BYTES))
                        if not chunk:
                            raise OSError(f"{info.location}: ends before tensor {tensor.name!r}'s data")
                        out.write(chunk)
                        left -= len(chunk)
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


def into_memory(model: ModelProto) -> ModelProto:
    """`model` with the data of its on-disk tensors read back into it (for callers that keep the model
    past this process's work folder); returns the same object."""
    for tensor in external_data_helper._get_all_tensors(model):
        if on_disk(tensor):
            tensor.CopyFrom(_loaded(tensor))
    return model
