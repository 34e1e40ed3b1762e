"""The calibration data as ONNX Runtime runs, and whose fault a failed run is.

Shared by the calibration loop (calibrate.py) and its shards (shards.py), so that both cut the
data into the same runs (a moving average and the summaries follow the runs) and report a bad
sample the same way.
"""

from __future__ import annotations

from itertools import chain
from typing import Callable, Iterator

import numpy as np

from qtool.errors import DataError, ModelError, QtoolError, one_line
from qtool.io.batching import per_run_limit
from qtool.io.samples import Batch, DataSource

# What ONNX Runtime says when it refuses feeds before running any node: the data's fault.
FEED_ERRORS = ("invalid dimensions for input", "invalid rank for input", "unexpected input data type",
               "missing input", "invalid input name", "invalid feed input name")


def first_and_rest(data: DataSource, batch_size: int) -> tuple[Batch, Iterator[Batch]]:
    """The data's first sample on its own (it measures the tensors' sizes, from which the rest is planned),
    and the rest of the data in batches of up to `batch_size` samples. Raises DataError for no samples."""
    batches = data.batches(batch_size)
    first = next(batches, None)
    if first is None:  # no files, or files that hold 0 samples
        raise DataError(f"{data.folder}: no samples to calibrate with")
    if first.count == 1:
        return first, batches
    return first.part(0, 1), chain([first.part(1, first.count)], batches)


def runs_of(batches: Iterator[Batch], most: int) -> Iterator[Batch]:
    """The batches cut into runs of at most `most` samples (the feeds are views, not copies)."""
    for batch in batches:
        if batch.count <= most:
            yield batch
            continue
        starts = [*range(0, batch.count, most), batch.count]
        for a, b in zip(starts[:-1], starts[1:]):
            yield batch.part(a, b)


def run_batch(execute: Callable[[Batch], dict[str, np.ndarray]], batch: Batch, data: DataSource,
              notes: list[str], proven: bool = True) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(outputs, samples) of one run; where ORT refuses a run of several samples, one run per sample
    (batch_size is "up to N per run", never a reason to fail), noted once in `notes`. `proven`: the
    model has already run on another sample, so a failure on this one is this sample's.

    Raises DataError for a sample ORT refuses or fails on after others ran, ModelError for a failure
    on the first sample."""
    try:
        outputs = execute(batch)
    except QtoolError:
        raise
    except Exception as exc:  # ORT reports bad feeds as assorted exception types
        if batch.count == 1:
            _raise_run_error(exc, data.where(batch.files[0]), proven)
        note = (f"ONNX Runtime refused runs of {batch.count} samples stacked along the batch axes "
                f"({one_line(str(exc)) or type(exc).__name__}): some ran one sample per run")
        if note.split(" samples", 1)[0] not in " ".join(notes):
            notes.append(note)
        for index in range(batch.count):
            yield from run_batch(execute, batch.part(index, index + 1), data, notes, proven)
        return
    yield outputs, batch.count


def _raise_run_error(exc: Exception, where: str, proven: bool) -> None:
    """Feeds ORT refuses, or a failure inside the model on one sample after others ran (e.g. a Gather
    index out of range), are the data's fault; a failure on the first sample is the model's."""
    message = one_line(str(exc)) or type(exc).__name__
    if any(marker in message.lower() for marker in FEED_ERRORS):
        raise DataError(f"{where}: ONNX Runtime refused this input: {message}") from None
    if proven:
        raise DataError(f"{where}: ONNX Runtime failed to run the float model on this input: {message}") from None
    raise ModelError(f"ONNX Runtime failed running the model (on {where}, whose arrays fit the model's "
                     f"declared inputs): {message}") from None


def batching_of(data: DataSource, per_run: int, batch_size: int, notes: list[str]) -> dict:
    """The table's `batching`: per input its batch axis and why, the samples a run held at most, and the
    notes (a stateful model's streams add theirs)."""
    most = 1 if data.state is not None else min(per_run, batch_size, per_run_limit(data.axes) or batch_size)
    if data.state is not None:
        carried = ", ".join(f"{name} <- {output}" for name, output in data.state.carry.items())
        notes.append(f"data.state: each data file ran as one stream, a chunk per run, state fed back ({carried})")
    return {"inputs": data.batching(), "samples_per_run": most, "notes": notes}
