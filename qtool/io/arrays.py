"""Array files read safely: `.npy` memory-mapped (never a pickle), `.npz` archives, ONNX TensorProto `.pb`.

Every reader checks what it got is numbers, and names the file and the real reason when it is not.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
from onnx import TensorProto, numpy_helper
from google.protobuf.message import DecodeError

from qtool.errors import DataError

# What numpy and zipfile raise on a damaged or hostile file: bad headers, short data,
# encrypted or oddly compressed members (RuntimeError, NotImplementedError, zlib.error),
# and shapes declared too large to allocate (MemoryError).
UNREADABLE = (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error, MemoryError)
NPY_MAGIC = b"\x93NUMPY"


def reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _not_npy(path: Path, head: bytes) -> str:
    """Why a file named .npy is not one, in words (never numpy's advice to load it unsafely)."""
    if head.startswith(b"PK"):
        return "it is a zip archive (an .npz?); rename it to .npz"
    if head[:1] == b"\x80":
        return "it is a Python pickle, which qtool never loads; save arrays with numpy.save"
    if not head:
        return "it is empty"
    return f"it does not start with the .npy signature \\x93NUMPY (it starts with {head[:6]!r})"


def read_npy(path: Path) -> np.ndarray:
    """The array, memory-mapped: only the parts sliced out are ever read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head != NPY_MAGIC:
        raise DataError(f"{path}: not a .npy file: {_not_npy(path, head)}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds Python objects (dtype object), which qtool never loads; "
                            "allowed: arrays of numbers") from None
        raise DataError(f"{path}: not a readable .npy file ({reason(exc)})") from None
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable .npy file ({reason(exc)})") from None
    return checked_array(array, path)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: checked_array(archive[key], path) for key in archive.files}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds Python objects (dtype object), which qtool never loads; "
                            "allowed: arrays of numbers keyed by input name") from None
        raise DataError(f"{path}: not a readable .npz file ({reason(exc)})") from None
    except (*UNREADABLE, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({reason(exc)})") from None


def npz_shapes(path: Path) -> dict[str, tuple]:
    """Each member's shape, read from its .npy header only; {} when the archive cannot say."""
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(member)
                    shapes[info.filename[:-4]] = header[0]
            return shapes
    except (*UNREADABLE, zipfile.BadZipFile, KeyError):
        return {}  # reading the file says what is wrong with it


def read_pb(path: Path) -> tuple[str, np.ndarray]:
    """An ONNX TensorProto file (`input_0.pb` of an ONNX test-data folder): its name and array."""
    tensor = TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        array = numpy_helper.to_array(tensor)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (DecodeError, *UNREADABLE, TypeError, KeyError) as exc:
        raise DataError(f"{path}: not a readable ONNX TensorProto file ({reason(exc)})") from None
    return tensor.name, checked_array(array, path)


def checked_array(array, path: Path) -> np.ndarray:
    if not isinstance(array, np.ndarray):  # an .npz member not named *.npy comes back as raw bytes
        raise DataError(f"{path}: holds a member that is not a .npy array; allowed: arrays keyed by input name")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: arrays of dtype {array.dtype} are not allowed; use numbers")
    return array
