"""A copy of a fixed-batch model (batch 1 declared) whose batch dimension is symbolic, for calibration
to run several samples at once; used only when it loads and gives the model's outputs, sample for sample.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
from onnx import ModelProto

from qtool.io.batching import stack
from qtool.io.samples import DataSource, model_inputs
from qtool.runtime.session import make_session, run

BATCH_DIM = "batch"
CHECKED_SAMPLES = 2


def batchable_copy(model: ModelProto, data: DataSource) -> tuple[ModelProto, DataSource, str | None]:
    """(model, data, note): a symbolic-batch copy and the data re-read for it where the model fixes its
    batch at 1 and the copy checks out; else the model and data as given, the note saying why."""
    fixed = [name for name, axis in data.axes.items() if axis.fixed]
    if not fixed or data.state is not None:  # a stateful model runs its streams one chunk at a time
        return model, data, None
    samples = [sample for _, sample in islice(data.samples(), CHECKED_SAMPLES)]
    if len(samples) < 2:
        return model, data, None
    candidate = _symbolic_batch(model, set(fixed))
    copy_data = data.with_inputs(model_inputs(candidate))
    why = _differs(model, candidate, samples, copy_data)
    if why:
        return model, data, (f"the model fixes its batch at 1 and a copy with a symbolic batch {why}: "
                             "calibration ran one sample per run")
    return candidate, copy_data, ("the model fixes its batch at 1: calibration ran on a copy with a symbolic "
                                  f"batch dimension, checked to give the same outputs on {len(samples)} samples")


def model_for_runs(model: ModelProto, data: DataSource, most: int, sample_bytes: float,
                   notes: list[str]) -> tuple[ModelProto, DataSource]:
    """(model, data) to run the rest of the samples on: for a model that fixes its batch at 1, its checked
    symbolic-batch copy where up to `most` > 1 samples may share a run (the check runs the model: on u2netp
    7 s and its peak memory, for nothing where runs hold one sample anyway). Notes go to `notes`."""
    if most > 1:
        copy, data, note = batchable_copy(model, data)
        notes += [note] if note else []
        return copy, data
    if any(axis.fixed for axis in data.axes.values()) and data.state is None:
        notes.append(f"the model fixes its batch at 1, and runs of one sample are what calibration.batch_size and "
                     f"the memory budget ({sample_bytes / 2**20:.0f} MB of tensors a sample) allow: calibration "
                     "ran it as it is")
    return model, data


def _symbolic_batch(model: ModelProto, inputs: set[str]) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in inputs:
            value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    for value in copy.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = BATCH_DIM
    for value in copy.graph.value_info:  # shapes inferred for batch 1 would contradict the runs
        value.type.tensor_type.ClearField("shape")
    return copy


def _differs(model: ModelProto, candidate: ModelProto, samples: list[dict], copy_data: DataSource) -> str | None:
    """Why the copy cannot stand in for the model on these samples, or None."""
    reference = make_session(model, optimize=False, arena=False)
    try:
        expected = [run(reference, sample) for sample in samples]
    except Exception as exc:  # the samples' fault, or the model's: the calibration loop names the file
        return f"cannot be checked: the model itself does not run on these samples ({' '.join(str(exc).split())[:200]})"
    del reference
    try:
        session = make_session(candidate, optimize=False, arena=False)
        got = run(session, stack([{**sample} for sample in samples], copy_data.axes))
    except Exception as exc:  # ORT's own exception types: the copy is not valid, say why
        return f"does not run ({' '.join(str(exc).split())[:200]})"
    for name, value in got.items():
        parts = [outputs[name] for outputs in expected]
        if any(np.ndim(part) == 0 or np.shape(part)[0] != 1 for part in parts):
            return f"cannot be checked: output {name} has no leading batch of 1"
        want = np.concatenate(parts)
        if value.shape != want.shape:
            return f"gives output {name} of shape {list(value.shape)} for {list(want.shape)}"
        scale = float(np.max(np.abs(want))) if want.size and want.dtype.kind == "f" else 0.0
        if want.dtype.kind == "f" and not np.allclose(value, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
            return f"gives other values for output {name}"
        if want.dtype.kind != "f" and not np.array_equal(value, want):
            return f"gives other values for output {name}"
    return None
