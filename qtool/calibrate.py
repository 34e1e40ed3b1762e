"""The streaming calibration loop: batches → ONNX Runtime → observers → ranges.

Only the tensors the plan will quantize are exposed, and each batch's outputs
are dropped before the next one is read, so memory does not grow with data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from onnx import ModelProto

from qtool.data import DataFolder
from qtool.errors import DataError
from qtool.numerics import QType
from qtool.observers import make_observer
from qtool.recipe import CalibrationSpec
from qtool.runner import make_session, run, with_outputs

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class TensorRange:
    lo: float
    hi: float
    method: str
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationTable:
    ranges: dict[str, TensorRange]
    samples: int


def calibrate(
    model: ModelProto,
    tensors: list[str],
    data: DataFolder,
    spec: CalibrationSpec,
    qtype: QType,
    symmetric: bool,
    progress: Progress | None = None,
) -> CalibrationTable:
    """Observe every named tensor over the data folder; return one range each."""
    session = make_session(with_outputs(model, tensors), optimize=False)
    observers = {name: make_observer(spec, qtype, symmetric) for name in tensors}
    total = min(len(data.files), spec.samples) if spec.samples else len(data.files)
    done = 0
    for batch in data.batches(spec.batch_size):
        try:
            outputs = run(session, batch.feeds)
        except Exception as exc:  # ORT reports bad feeds as assorted exception types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{data.folder / batch.files[0]}: ONNX Runtime refused this input: {message}") from None
        for name, observer in observers.items():
            observer.update(outputs[name])
        del outputs
        done += len(batch.files)
        if progress:
            progress(done, max(total, done))
    if done == 0:
        raise DataError(f"{data.folder}: no samples to calibrate with")
    ranges = {}
    for name, observer in observers.items():
        result = observer.result()
        ranges[name] = TensorRange(result.lo, result.hi, spec.method, observer.summary())
    return CalibrationTable(ranges, done)
