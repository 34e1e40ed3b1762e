"""The calibration data as ONNX Runtime feeds for the algorithms' measuring passes, in runs the model accepts."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from onnx import ModelProto

from qtool.io.data import DataFolder, model_inputs


def feeds(model: ModelProto, data: DataFolder, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, feeds) per run: batches of `batch_size`, cut to the batch dimension an input fixes
    (u2netp's is 1); one batch at a time, so memory is one run's."""
    fixed = [spec.shape[0] for spec in model_inputs(model)  # -1 (PaddlePaddle's exports) is not fixed
             if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0]
    step = min([batch_size, *fixed])
    for batch in data.batches(batch_size):
        count = len(batch.files)
        for start in range(0, count, step):
            yield min(step, count - start), {name: array[start:start + step] for name, array in batch.feeds.items()}
