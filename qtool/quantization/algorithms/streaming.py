"""The calibration data run through a measuring session for the algorithms' passes, in runs the model
accepts; a stateful model's streams chunk by chunk with its state carried (qtool.runtime.streams)."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from qtool.io.batching import batch_axes
from qtool.io.data import model_inputs
from qtool.io.samples import DataSource
from qtool.runtime.session import run
from qtool.runtime.streams import StateCarry


def feeds(model: ModelProto, data: DataSource, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, feeds) per run: batches of `batch_size`, cut to the size the model fixes on an input's
    batch axis (u2netp's is 1); scalars and inputs batched on another axis (state) are cut along their
    own axis or not at all. One batch at a time, so memory is one run's."""
    axes = batch_axes(model_inputs(model))
    fixed = [spec.shape[axis.axis] for spec in model_inputs(model)  # -1 (PaddlePaddle's exports) is not fixed
             if (axis := axes[spec.name]).axis is not None and spec.shape
             and isinstance(spec.shape[axis.axis], int) and spec.shape[axis.axis] > 0]
    step = min([batch_size, *fixed])
    for batch in data.batches(batch_size):
        for start in range(0, batch.count, step):
            part = batch if batch.count <= step else batch.part(start, start + step)
            yield part.count, part.feeds


def measured(session: ort.InferenceSession, model: ModelProto, data: DataSource,
             batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, the session's outputs) per run of `feeds`; with `data.state`, one chunk per run, each
    fed the state the session returned for the chunk before."""
    if data.state is not None:
        carry = StateCarry(data.state)
        for batch in data.batches(1):
            yield batch.count, carry.run(partial(run, session), batch)
        return
    for count, batch in feeds(model, data, batch_size):
        yield count, run(session, batch)
