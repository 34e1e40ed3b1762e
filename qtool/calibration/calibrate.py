"""The streaming calibration loop (batches → ONNX Runtime → observers → ranges); its file: table_file.py.

minmax tensors are reduced inside the graph (calibration/reductions.py); only the other tensors the
plan will quantize are exposed, and each run's outputs are dropped before the next, so memory does
not grow with data. Nor does it grow with `batch_size`: one ONNX Runtime run holds at most
MEMORY_BUDGET bytes of these tensors (see `calibrate`), whatever the recipe or the command line asks.
With `calibration.workers`, observers run in worker processes too (calibration/worker_pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import numpy as np
from onnx import ModelProto

from qtool.calibration.batchable import batchable_copy
from qtool.calibration.hessians import HessianObserver, Im2Col
from qtool.calibration.observers import make_observer
from qtool.calibration.reductions import InGraphMinMax, reducible
from qtool.calibration.worker_pool import ObserverPool, SharedMemoryFull, SharedOutputs, aligned, worker_count
from qtool.errors import DataError, ModelError, QtoolError, one_line
from qtool.io.batching import per_run_limit
from qtool.io.samples import Batch, DataSource
from qtool.numerics import QType
from qtool.recipe.schema import CalibrationSpec
from qtool.runtime.session import make_session, run, with_outputs
from qtool.runtime.streams import StateCarry

Progress = Callable[[int, int | None], None]

# Bytes of exposed tensors one ONNX Runtime run may return. ORT holds every exposed tensor until
# the run ends, and hands each back as a numpy copy, so a run's peak is about twice this on top
# of the model. A batch is split into runs of as many samples as fit (at least one); where one
# sample alone is over it, the tensors are split into groups, each exposed in its own pass over
# the data (one session at a time). Measured on ppocr_det (320x320, 287 tensors, 142 MB per
# sample): peak RSS 1.36 GB for runs of 8 samples, 0.29 GB for runs of one. With worker processes
# the outputs go straight into a shared file instead (no copy), and runs get half the budget.
MEMORY_BUDGET = 256 * 2**20


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
    # Where a table read from a file came from: its path, model sha256, data listing, recipe.
    provenance: dict = field(default_factory=dict)
    # E[x xᵀ] of weight inputs, by node, for gptq rounding: [groups, d, d]; never written to the file.
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    # How samples were stacked into runs: per input its batch axis and why; notes on fallbacks.
    batching: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the calibration ran, where it differs from the recipe
    # calibration.method auto: the range each tensor chose (qtool.quantization.algorithms.range_choice)
    method_choice: dict = field(default_factory=dict)
    # Every tensor's shape on one sample (runtime.session.tensor_shapes): what the placement pass
    # estimates kernel costs from; empty: no such estimate. Never written to the file.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def calibrate(
    model: ModelProto,
    tensors: list[str],
    data: DataSource,
    spec: CalibrationSpec,
    qtype: QType,
    symmetric: bool,
    progress: Progress | None = None,
    hessian_inputs: dict[str, tuple[str, Im2Col]] | None = None,
) -> CalibrationTable:
    """Observe every named tensor over the data; return one range each.

    `spec.overrides` choose another method (or percentile) per tensor: the first match wins.
    `hessian_inputs` (node -> its weight's input and geometry) adds E[x xᵀ] per node, in the same pass.
    Runs hold up to `spec.batch_size` samples stacked along each input's batch axis; a model that
    fixes its batch at 1 runs on a checked symbolic-batch copy where the memory budget allows runs of
    several samples, else one sample per run. minmax tensors are measured in the graph (reductions.py).
    """
    notes: list[str] = []
    total = data.total  # None: not known before it is read (a generator)
    specs = {name: spec.for_tensor(name) for name in tensors}
    moments = {node: (tensor, HessianObserver(geometry)) for node, (tensor, geometry) in (hessian_inputs or {}).items()}
    # minmax tensors are measured in the graph (calibration/reductions.py); only the rest are exposed whole
    in_graph = InGraphMinMax(reducible(model, tensors, {name: specs[name].method for name in tensors},
                                       {tensor for tensor, _ in moments.values()}))
    exposed = [name for name in dict.fromkeys([*tensors, *(tensor for tensor, _ in moments.values())])
               if name not in in_graph.tensors]
    session = make_session(in_graph.add_to(with_outputs(model, exposed)), optimize=False, in_order=True,
                           arena=False)
    runs = _runs(data, spec.batch_size)
    first = next(runs, None)
    if first is None:  # no files, or files that hold 0 samples
        raise DataError(f"{data.folder}: no samples to calibrate with")
    carry = StateCarry(data.state)  # a stateful model: each chunk gets the state the one before returned
    # one sample, every tensor: bytes per sample
    (outputs, _), = _run(partial(carry.run, in_graph.checked(model, partial(run, session))), first, data, notes,
                         proven=False)
    sizes = {**{name: float(outputs[name].nbytes) for name in exposed}, **in_graph.nbytes(outputs)}
    histograms = sum(sizes[name] for name in tensors if specs[name].method != "minmax")
    workers = worker_count(spec.workers, histograms * (total or spec.samples or 1))
    budget = MEMORY_BUDGET // 2 if workers else MEMORY_BUDGET
    groups = _groups(exposed, sizes, budget)
    passes = len(groups)
    # Samples per run as if every tensor were exposed: their bytes bound ORT's own working memory too,
    # and the runs (which a moving average and the summaries follow) stay those of exposing them all.
    per_run = max(1, int(budget // max(sum(sizes.values()), 1.0)))
    copy, data = _batchable(model, data, min(per_run, spec.batch_size), sum(sizes.values()), notes)
    if copy is not model:  # the copy's session is made below; the first sample is observed
        model, session, runs = copy, None, _runs(data, spec.batch_size)
        next(runs)
    capacity = max(sum(aligned(sizes[name] * per_run) for name in group) for group in groups)
    observed = {name: (specs[name], qtype, symmetric, total) for name in tensors if name not in in_graph.tensors}
    minmax = {name: make_observer(specs[name], qtype, symmetric, total) for name in in_graph.tensors}
    pinned = {tensor: sizes[tensor] for tensor, _ in moments.values()}  # Hessians are summed here
    shared, pool_notes = None, []
    if workers:
        try:
            shared = SharedOutputs(capacity)
        except SharedMemoryFull as exc:
            workers, pool_notes = 0, [f"calibration observers ran in this process only: {exc}"]
    try:
        with ObserverPool(observed, sizes, workers, pinned, shared) as pool:
            if shared:
                outputs = shared.adopt(outputs, first.feeds)  # for the workers
            reduced = partial(in_graph.observe, minmax)
            _observe(pool, moments, outputs, shared, reduced)
            del outputs
            _tick(progress, 1, max(total or 0, 1), passes)
            whole = set(exposed)
            for index, group in enumerate(groups):
                mine = set(group)
                if passes > 1 or workers or session is None:  # a session per group; one that suits workers; the copy
                    session = None
                    exposing = with_outputs(model, group)
                    session = make_session(in_graph.add_to(exposing) if index == 0 else exposing, optimize=False,
                                           pooled=bool(workers), in_order=True, arena=False)
                if shared:
                    shared.use(session)
                execute = shared.run if shared else partial(run, session)
                execute = partial(carry.run, in_graph.checked(model, execute) if index == 0 else execute)
                if index:
                    runs = _runs(data, spec.batch_size)
                    again = next(runs)  # the first sample has been observed in every tensor
                    if data.state is not None:  # but the stream's next chunk needs the state it returns
                        execute(again)
                done = 1
                for batch in _split(runs, per_run):
                    for outputs, count in _run(execute, batch, data, notes):
                        # the model's own outputs come with every pass: each tensor is observed in its group's
                        outputs = {name: value for name, value in outputs.items() if name in mine or name not in whole}
                        _observe(pool, moments, outputs, shared, reduced if index == 0 else None)
                        done += count
                        del outputs  # nothing of this run survives into the next
                    del batch
                    samples = max(total or 0, done)
                    _tick(progress, 1 + index * (samples - 1) + done - 1, samples, passes)
            found = {**pool.results(), **{name: (observer.result(), observer.summary())
                                          for name, observer in minmax.items()}}
    finally:
        if shared:
            shared.close()
    del session
    ranges = {name: TensorRange(float(found[name][0].lo), float(found[name][0].hi), specs[name].method, found[name][1])
              for name in tensors}
    hessians = {node: h for node, (_, observer) in moments.items() if (h := observer.result()) is not None}
    most = 1 if data.state is not None else min(per_run, spec.batch_size, per_run_limit(data.axes) or spec.batch_size)
    if data.state is not None:
        carried = ", ".join(f"{name} <- {output}" for name, output in data.state.carry.items())
        notes.append(f"data.state: each data file ran as one stream, a chunk per run, state fed back ({carried})")
    batching = {"inputs": data.batching(), "samples_per_run": most, "notes": notes}
    return CalibrationTable(ranges, done, hessians=hessians, batching=batching, notes=pool_notes)


def _observe(pool: ObserverPool, moments: dict, outputs: dict[str, np.ndarray], shared: SharedOutputs | None,
             reduced: Callable[[dict[str, np.ndarray]], None] | None) -> None:
    pool.observe(outputs, shared)
    if reduced:
        reduced(outputs)
    for tensor, observer in moments.values():
        if tensor in outputs:
            observer.update(outputs[tensor])


def _batchable(model: ModelProto, data: DataSource, most: int, sample_bytes: float,
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


def _runs(data: DataSource, batch_size: int) -> Iterator[Batch]:
    """The data's batches, the first sample on its own (it measures the tensors' size)."""
    batches = data.batches(batch_size)
    for batch in batches:
        yield from _split(iter([batch]), 1, first_only=True)
        break
    yield from batches


def _split(runs: Iterator[Batch], step: int, first_only: bool = False) -> Iterator[Batch]:
    """Runs of at most `step` samples (the feeds are views, not copies); `first_only`: the first
    sample alone, then the rest unsplit."""
    for batch in runs:
        if batch.count <= step:
            yield batch
            continue
        starts = [0, 1, batch.count] if first_only else [*range(0, batch.count, step), batch.count]
        for a, b in zip(starts[:-1], starts[1:]):
            yield batch.part(a, b)


def _groups(tensors: list[str], sizes: dict[str, float], budget: float) -> list[list[str]]:
    """Consecutive groups of tensors whose bytes per sample fit the budget (a tensor over it alone);
    one group when they all fit."""
    groups: list[list[str]] = [[]]
    used = 0.0
    for name in tensors:
        if groups[-1] and used + sizes[name] > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += sizes[name]
    return groups


# What ONNX Runtime says when it refuses feeds before running any node: the data's fault.
FEED_ERRORS = ("invalid dimensions for input", "invalid rank for input", "unexpected input data type",
               "missing input", "invalid input name", "invalid feed input name")


def _run(execute: Callable[[Batch], dict[str, np.ndarray]], batch: Batch, data: DataSource,
         notes: list[str], proven: bool = True) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(outputs, samples) of one run; where ORT refuses a run of several samples, one run per sample
    (batch_size is "up to N per run", never a reason to fail), noted once. `proven`: the model has
    already run on another sample, so a failure on this one is this sample's."""
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
            yield from _run(execute, batch.part(index, index + 1), data, notes, proven)
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


def _tick(progress: Progress | None, runs_done: int, samples: int, passes: int) -> None:
    """Progress in samples, `samples` in all: the first sample runs once for every tensor, each other
    once per pass (tensor group), so with several passes the share of those sample-runs done, scaled to
    the samples (the rate and ETA hold, and the count ends at samples/samples)."""
    if progress:
        runs = 1 + (samples - 1) * passes
        progress(min(samples, runs_done * samples // runs), samples)
