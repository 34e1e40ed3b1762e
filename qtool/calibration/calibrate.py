"""The streaming calibration loop (batches → ONNX Runtime → observers → ranges); its file: table_file.py.

minmax tensors are reduced inside the graph (calibration/reductions.py); only the other tensors the
plan will quantize are exposed, and each run's outputs are dropped before the next, so memory does
not grow with data. Nor does it grow with `batch_size`: one ONNX Runtime run holds at most
MEMORY_BUDGET bytes of these tensors (calibration/passes.py), whatever the recipe or the command line asks.
With `calibration.workers`, observers run in worker processes too (calibration/worker_pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import numpy as np
from onnx import ModelProto

from qtool.calibration.batchable import model_for_runs
from qtool.calibration.hessians import HessianObserver, Im2Col
from qtool.calibration.observers import Observer, Range, make_observer
from qtool.calibration.passes import PassPlan, plan_passes
from qtool.calibration.reductions import InGraphMinMax, reducible
from qtool.calibration.runs import batching_of, first_and_rest, run_batch, runs_of
from qtool.calibration.worker_pool import ObserverPool, SharedMemoryFull, SharedOutputs, aligned, worker_count
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
    Raises DataError for data without samples or a sample ONNX Runtime refuses, ModelError where the
    model fails on the first sample.
    """
    notes: list[str] = []
    total = data.total  # None: not known before it is read (a generator)
    specs = {name: spec.for_tensor(name) for name in tensors}
    moments = {node: (tensor, HessianObserver(geometry)) for node, (tensor, geometry) in (hessian_inputs or {}).items()}
    in_graph = InGraphMinMax(reducible(model, tensors, {name: specs[name].method for name in tensors},
                                       {tensor for tensor, _ in moments.values()}))
    exposed = [name for name in dict.fromkeys([*tensors, *(tensor for tensor, _ in moments.values())])
               if name not in in_graph.tensors]
    session = make_session(in_graph.add_to(with_outputs(model, exposed)), optimize=False, in_order=True,
                           arena=False)
    first, runs = first_and_rest(data, spec.batch_size)
    carry = StateCarry(data.state)  # a stateful model: each chunk gets the state the one before returned
    # one sample, every tensor: bytes per sample
    (outputs, _), = run_batch(partial(carry.run, in_graph.checked(model, partial(run, session))), first, data, notes,
                              proven=False)
    sizes = {**{name: float(outputs[name].nbytes) for name in exposed}, **in_graph.nbytes(outputs)}
    histograms = sum(sizes[name] for name in tensors if specs[name].method != "minmax")
    workers = worker_count(spec.workers, histograms * (total or spec.samples or 1))
    plan = plan_passes(exposed, sizes, MEMORY_BUDGET // 2 if workers else MEMORY_BUDGET)
    copy, data = model_for_runs(model, data, min(plan.per_run, spec.batch_size), sum(sizes.values()), notes)
    if copy is not model:  # the copy's session is made below; the first sample is observed
        model, session = copy, None
        _, runs = first_and_rest(data, spec.batch_size)
    observed = {name: (specs[name], qtype, symmetric, total) for name in tensors if name not in in_graph.tensors}
    minmax = {name: make_observer(specs[name], qtype, symmetric, total) for name in in_graph.tensors}
    pinned = {tensor: sizes[tensor] for tensor, _ in moments.values()}  # Hessians are summed here
    shared, pool_notes = None, []
    if workers:
        try:
            shared = SharedOutputs(max(sum(aligned(sizes[name] * plan.per_run) for name in group)
                                       for group in plan.groups))
        except SharedMemoryFull as exc:
            workers, pool_notes = 0, [f"calibration observers ran in this process only: {exc}"]
    if len(plan.groups) > 1 or workers:
        session = None  # each pass makes its own (one that suits the workers)
    try:
        with ObserverPool(observed, sizes, workers, pinned, shared) as pool:
            observers = _Observers(pool, shared, in_graph, minmax, moments)
            observers.observe(shared.adopt(outputs, first.feeds) if shared else outputs, reductions=True)
            del outputs
            _tick(progress, 1, max(total or 0, 1), len(plan.groups))
            done = _observe_passes(model, data, spec.batch_size, plan, runs, session, carry, observers, notes,
                                   progress)
            found = observers.results()
    finally:
        if shared:
            shared.close()
    del session
    ranges = {name: TensorRange(float(found[name][0].lo), float(found[name][0].hi), specs[name].method, found[name][1])
              for name in tensors}
    hessians = {node: h for node, (_, observer) in moments.items() if (h := observer.result()) is not None}
    return CalibrationTable(ranges, done, hessians=hessians, notes=pool_notes,
                            batching=batching_of(data, plan.per_run, spec.batch_size, notes))


@dataclass(frozen=True)
class _Observers:
    """Everything a run's outputs feed: the pool's observers (histograms, and minmax of tensors exposed
    whole), the observers of the in-graph reductions, and gptq's Hessians (summed in this process)."""

    pool: ObserverPool
    shared: SharedOutputs | None  # where the outputs are, for the pool's workers; None: no workers
    in_graph: InGraphMinMax
    minmax: dict[str, Observer]  # of in_graph's tensors
    moments: dict[str, tuple[str, HessianObserver]]  # node -> (its weight's input, its Hessian)

    def observe(self, outputs: dict[str, np.ndarray], reductions: bool) -> None:
        """`reductions`: the outputs hold the in-graph reductions (the first pass's runs return them)."""
        self.pool.observe(outputs, self.shared)
        if reductions:
            self.in_graph.observe(self.minmax, outputs)
        for tensor, observer in self.moments.values():
            if tensor in outputs:
                observer.update(outputs[tensor])

    def results(self) -> dict[str, tuple[Range, dict]]:
        """Each tensor's range and summary (the pool's workers exit)."""
        return {**self.pool.results(), **{name: (observer.result(), observer.summary())
                                          for name, observer in self.minmax.items()}}


def _observe_passes(model: ModelProto, data: DataSource, batch_size: int, plan: PassPlan, runs: Iterator[Batch],
                    session, carry: StateCarry, observers: _Observers, notes: list[str],
                    progress: Progress | None) -> int:
    """Run the data after its first sample once per pass of `plan`, each run's outputs to `observers`;
    the samples seen in a pass, the first included.

    `runs`: the rest of the data for the first pass (later passes read it again); `session`: the first
    pass's where it can run it, else None. The in-graph reductions ride with the first pass only.
    """
    total, passes, shared = data.total, len(plan.groups), observers.shared
    whole = {name for group in plan.groups for name in group}
    for index, group in enumerate(plan.groups):
        mine = set(group)
        if index or session is None:
            session = None  # the pass before's goes before this one's is made
            exposing = with_outputs(model, group)
            session = make_session(observers.in_graph.add_to(exposing) if index == 0 else exposing, optimize=False,
                                   pooled=bool(shared), in_order=True, arena=False)
        if shared:
            shared.use(session)
        execute = shared.run if shared else partial(run, session)
        execute = partial(carry.run, observers.in_graph.checked(model, execute) if index == 0 else execute)
        if index:
            again, runs = first_and_rest(data, batch_size)  # the first sample has been observed in every tensor
            if data.state is not None:  # but the stream's next chunk needs the state it returns
                execute(again)
        done = 1
        for batch in runs_of(runs, plan.per_run):
            for outputs, count in run_batch(execute, batch, data, notes):
                # the model's own outputs come with every pass: each tensor is observed in its group's
                outputs = {name: value for name, value in outputs.items() if name in mine or name not in whole}
                observers.observe(outputs, reductions=index == 0)
                done += count
                del outputs  # nothing of this run survives into the next
            del batch
            samples = max(total or 0, done)
            _tick(progress, 1 + index * (samples - 1) + done - 1, samples, passes)
    return done


def _tick(progress: Progress | None, runs_done: int, samples: int, passes: int) -> None:
    """Progress in samples, `samples` in all: the first sample runs once for every tensor, each other
    once per pass (tensor group), so with several passes the share of those sample-runs done, scaled to
    the samples (the rate and ETA hold, and the count ends at samples/samples)."""
    if progress:
        runs = 1 + (samples - 1) * passes
        progress(min(samples, runs_done * samples // runs), samples)
