"""Calibration ranges in other tools' formats: TensorRT's calibration cache and ONNX Runtime's
TensorRT-EP calibration table (calibration.json / .flatbuffers / .cache), read and written.

TensorRT's cache is text: a header line (`TRT-8601-EntropyCalibration2`), then `tensor: <hex>` per
line, the hex being the big-endian bits of a float32 scale = amax / 127; the range is [-amax, amax].
ONNX Runtime's table is what onnxruntime.quantization.write_calibration_table writes: JSON with each
tensor's lowest and highest, and .flatbuffers/.cache with one number per tensor, max(highest, lowest).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.calibration.table_file import load_table
from qtool.errors import CalibrationError
from qtool.io.artifacts import write_artifacts, write_text_atomic

FORMATS = ("qtool", "trt-cache", "ort-table")
TRT_HEADER = "TRT-8601-EntropyCalibration2"  # TensorRT 8.6's header; TensorRT recalibrates on another version
TRT_QMAX = 127
ORT_FILES = ("calibration.json", "calibration.flatbuffers", "calibration.cache")


def trt_scale_hex(amax: float) -> str:
    return struct.pack(">f", amax / TRT_QMAX).hex()


def trt_amax(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0] * TRT_QMAX


def trt_cache_text(table: CalibrationTable) -> str:
    lines = [TRT_HEADER]
    for name, r in sorted(table.ranges.items()):
        lines.append(f"{name}: {trt_scale_hex(max(abs(r.lo), abs(r.hi)))}")
    return "\n".join(lines) + "\n"


def save_foreign(table: CalibrationTable, fmt: str, output: Path, overwrite: bool) -> None:
    """Write `table` as a TensorRT cache (a file) or an ORT TensorRT-EP table (a folder of three files)."""
    if fmt == "trt-cache":
        write_text_atomic(output, trt_cache_text(table))
        return
    from onnxruntime.quantization.calibrate import TensorData  # heavy: only when asked for
    from onnxruntime.quantization.quant_utils import write_calibration_table

    # ORT's TensorData takes float32 only: ranges are rounded to float32 (min/max ranges already are)
    cache = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi))
             for name, r in sorted(table.ranges.items())}

    # ORT writes the three files into one folder: the first writer fills the staging folder for all three
    write_artifacts(output, overwrite, {ORT_FILES[0]: lambda path: write_calibration_table(cache, str(path.parent))})


def load_any_table(path: str | Path) -> CalibrationTable:
    """A qtool table, a TensorRT cache, or an ORT table (one of its files, or its folder), by content."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ORT_FILES if (path / name).is_file()]
        if not found:
            raise CalibrationError(f"{path}: a folder without {', '.join(ORT_FILES)}; give a calibration file")
        path = found[0]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration table: {exc.strerror or exc}") from None
    text = _text(data)
    if text is not None and text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}: not a calibration table (not valid JSON: {exc})") from None
        except RecursionError:  # json nests by recursion: thousands of [ or { exhaust Python's stack
            raise CalibrationError(f"{path}: not a calibration table (JSON nested too deeply)") from None
        if _is_ort_json(document):
            return _imported(_ort_json(document, path), path, "ort-table")
        return load_table(path)  # qtool's table, or says what it expected
    if text is not None and text.startswith("TRT-"):
        return _imported(_trt_cache(text, path), path, "trt-cache")
    if text is not None:
        return _imported(_ort_cache(text, path), path, "ort-table")
    return _imported(_ort_flatbuffers(data, path), path, "ort-table")


def _is_ort_json(document) -> bool:
    if isinstance(document, dict) and document.get("CLS") == "TensorsData":
        return True
    return (isinstance(document, dict) and "format" not in document and bool(document)
            and all(isinstance(v, (dict, list)) for v in document.values()))


def _text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if "\x00" not in text else None


def _imported(ranges: dict[str, TensorRange], path: Path, fmt: str) -> CalibrationTable:
    if not ranges:
        raise CalibrationError(f"{path}: {fmt} holds no tensor ranges")
    return CalibrationTable(ranges, 0, {"file": str(path), "format": fmt})


def _finite(value, where: str, path: Path) -> float:
    if isinstance(value, list) and len(value) == 1:  # numpy scalars may come out as one-item lists
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{path}: {where}: expected a finite number, got {value!r}")
    return float(value)


def _symmetric(amax: float, name: str, path: Path, method: str) -> TensorRange:
    if amax < 0:
        raise CalibrationError(f"{path}: {name}: a range's magnitude cannot be negative ({amax:g})")
    return TensorRange(-amax, amax, method)


def _trt_cache(text: str, path: Path) -> dict[str, TensorRange]:
    lines = text.splitlines()
    method = f"trt-cache {lines[0].strip()}"
    ranges = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        try:
            amax = trt_amax(value.strip()) if sep and len(value.strip()) == 8 else None
        except ValueError:
            amax = None
        if amax is None or not math.isfinite(amax):
            raise CalibrationError(f"{path}:{number}: expected `tensor: <8 hex digits of a float32 scale>`, "
                                   f"got {line.strip()[:80]!r}")
        ranges[name.strip()] = _symmetric(amax, name.strip(), path, method)
    return ranges


def _ort_json(document, path: Path) -> dict[str, TensorRange]:
    if isinstance(document, dict) and document.get("CLS") == "TensorsData":
        document = document.get("data")
    if not isinstance(document, dict):
        raise CalibrationError(f"{path}: not a calibration table (neither qtool's nor ONNX Runtime's JSON)")
    ranges = {}
    for name, entry in document.items():
        if isinstance(entry, dict) and "lowest" in entry and "highest" in entry:
            lo, hi = entry["lowest"], entry["highest"]
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:  # older onnxruntime: [lowest, highest]
            lo, hi = entry
        else:
            raise CalibrationError(f"{path}: {name}: expected {{lowest, highest}} or [lowest, highest]")
        lo, hi = _finite(lo, f"{name}.lowest", path), _finite(hi, f"{name}.highest", path)
        if lo > hi:
            raise CalibrationError(f"{path}: {name}: lowest {lo:g} is above highest {hi:g}")
        ranges[name] = TensorRange(lo, hi, "ort-table")
    return ranges


def _ort_cache(text: str, path: Path) -> dict[str, TensorRange]:
    ranges = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, _, value = line.rstrip().rpartition(" ")
        try:
            amax = float(value)
        except ValueError:
            amax = math.nan
        if not name or not math.isfinite(amax):
            raise CalibrationError(f"{path}:{number}: expected `tensor value` (ONNX Runtime's calibration.cache) "
                                   f"or a TRT- header (TensorRT's cache), got {line.strip()[:80]!r}")
        ranges[name] = _symmetric(amax, name, path, "ort-table")
    return ranges


def _ort_flatbuffers(data: bytes, path: Path) -> dict[str, TensorRange]:
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    try:
        table = TrtTable.GetRootAsTrtTable(data, 0)
        pairs = [(table.Dict(i).Key().decode(), table.Dict(i).Value().decode()) for i in range(table.DictLength())]
        return {name: _symmetric(float(value), name, path, "ort-table") for name, value in pairs}
    except CalibrationError:
        raise
    except Exception as exc:  # flatbuffers raises struct/index/unicode errors on a foreign file
        raise CalibrationError(f"{path}: not a calibration table (neither text, JSON nor ONNX Runtime's "
                               f"flatbuffers: {type(exc).__name__})") from None
