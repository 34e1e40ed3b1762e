"""The calibration data run through a measuring session for the algorithms' passes, in runs the model
accepts; a stateful model's streams chunk by chunk with its state carried (qtool.runtime.streams)."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from qtool.io.data import model_inputs
from qtool.io.samples import DataSource
from qtool.runtime.session import run
from qtool.runtime.streams import StateCarry


def feeds(model: ModelProto, data: DataSource, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, feeds) per run: batches of `batch_size`, cut to the batch dimension an input fixes
    (u2netp's is 1); one batch at a time, so memory is one run's."""
    fixed = [spec.shape[0] for spec in model_inputs(model)  # -1 (PaddlePaddle's exports) is not fixed
             if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0]
    step = min([batch_size, *fixed])
    for batch in data.batches(batch_size):
        count = len(batch.files)
        for start in range(0, count, step):
            yield min(step, count - start), {name: array[start:start + step] for name, array in batch.feeds.items()}


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
