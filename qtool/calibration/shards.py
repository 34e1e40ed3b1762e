"""Calibration split into shards of consecutive runs, observed in Ray tasks, merged exactly.

This process reads the data (as `calibrate` would: same batches, same runs), observes the first
sample itself (which fixes every histogram's bin unit), and sends the rest as arrays, a shard of
consecutive batches per task, through the executor's object store: workers need no access to
the data folder. Each task runs the model over its shard and returns its observers; they merge in
data order (observers.merge_shards) into exactly what one process would have measured, so the
table is byte-identical to `calibrate` with `calibration.workers: 0`. A tensor whose first sample
is all zeros has no unit yet: a shard that fixed another one is observed again with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator

import numpy as np
import onnx
from onnx import ModelProto

from qtool.calibration.batchable import model_for_runs
from qtool.calibration.calibrate import MEMORY_BUDGET, CalibrationTable, Progress, TensorRange, calibrate
from qtool.calibration.observers import histogram_unit, make_observer, merge_shards, shard_observer
from qtool.calibration.passes import plan_passes
from qtool.calibration.runs import batching_of, first_and_rest, run_batch, runs_of
from qtool.distributed.ray_executor import LostTask, RayExecutor, fetch
from qtool.errors import UsageError, WorkerError
from qtool.io.samples import DataSource
from qtool.numerics import QType
from qtool.recipe.schema import CalibrationSpec
from qtool.runtime.session import make_session, run, with_outputs

SHARDS_PER_JOB = 2  # shards per task slot: a slow node holds up at most half its share


@dataclass(frozen=True)
class ShardPlan:
    """What every shard task shares (put into the object store once)."""

    model: object  # the (batchable) model's bytes, or a reference to them in the object store
    groups: tuple[tuple[str, ...], ...]  # tensors exposed per pass over the shard
    per_run: int  # samples per ONNX Runtime run
    specs: dict  # tensor -> CalibrationSpec (its method after overrides)
    qtype: QType
    symmetric: bool
    expected: int | None  # samples in all the data, when known (range drift)
    units: dict  # tensor -> histogram bin unit fixed by the first sample
    folder: str  # where the data came from, for messages naming a sample's file


@dataclass(frozen=True)
class _Where:
    """Stands in for the data source in a task: names a sample's file in messages."""

    folder: str

    def where(self, name: str) -> str:
        return f"{self.folder}/{name}" if name else self.folder


def _run_feeds(session, batch) -> dict[str, np.ndarray]:
    """One run of a batch's feeds (sharded data is never a stateful stream: calibrate_with keeps those here)."""
    return run(session, batch.feeds)


def observe_shard(task: tuple) -> tuple[dict, int, list[str]]:
    """A task: (plan, samples before this shard, its batches) -> (observers, samples seen, notes)."""
    plan, offset, batches = task
    model = onnx.load_model_from_string(fetch(plan.model))
    observers = {name: shard_observer(plan.specs[name], plan.qtype, plan.symmetric, plan.expected, offset,
                                      plan.units.get(name))
                 for group in plan.groups for name in group}
    notes: list[str] = []
    done = 0
    for group in plan.groups:
        session = make_session(with_outputs(model, group), optimize=False)
        done = 0
        for batch in runs_of(iter(batches), plan.per_run):
            for outputs, count in run_batch(partial(_run_feeds, session), batch, _Where(plan.folder), notes):
                for name in group:
                    observers[name].update(outputs[name])
                done += count
        del session
    return observers, done, notes


def calibrate_sharded(model: ModelProto, tensors: list[str], data: DataSource, spec: CalibrationSpec, qtype: QType,
                      symmetric: bool, executor, progress: Progress | None = None) -> CalibrationTable:
    """`calibrate` with the observing done in `executor`'s tasks (Ray); the same table, bit for bit.

    Raises DataError for data without samples, WorkerError when the executor lost a shard after
    its retries.
    """
    notes: list[str] = []
    total = data.total
    specs = {name: spec.for_tensor(name) for name in tensors}
    session = make_session(with_outputs(model, tensors), optimize=False)
    first, runs = first_and_rest(data, spec.batch_size)
    (outputs, _), = run_batch(partial(_run_feeds, session), first, data, notes, proven=False)
    del session
    sizes = {name: float(outputs[name].nbytes) for name in tensors}
    passes = plan_passes(tensors, sizes, MEMORY_BUDGET)
    copy, data = model_for_runs(model, data, min(passes.per_run, spec.batch_size), sum(sizes.values()), notes)
    if copy is not model:  # the tasks run the copy; the first sample is observed here
        model = copy
        _, runs = first_and_rest(data, spec.batch_size)
    firsts = {name: make_observer(specs[name], qtype, symmetric, total) for name in tensors}
    for name, observer in firsts.items():
        observer.update(outputs[name])
    del outputs
    units = {name: unit for name in tensors if (unit := histogram_unit(firsts[name])) is not None}
    plan = ShardPlan(executor.put(model.SerializeToString()), tuple(tuple(g) for g in passes.groups), passes.per_run,
                     specs, qtype, symmetric, total, units, str(data.folder))
    per_shard = max(spec.batch_size, math.ceil(max((total or 0) - 1, 1) / (executor.jobs * SHARDS_PER_JOB)))
    shards: list[tuple[int, object]] = []  # (samples before the shard, its batches in the object store)

    def read_shards():
        """Shards as the data is read: each is put and starts while the next is read."""
        offset, pending, count = 1, [], 0
        for batch in runs:
            pending.append(batch)
            count += batch.count
            if count >= per_shard:
                shards.append((offset, executor.put(pending)))
                yield shards[-1]
                offset, pending, count = offset + count, [], 0
        if pending:
            shards.append((offset, executor.put(pending)))
            yield shards[-1]

    found = _observe(executor, plan, read_shards(), progress, total)
    # A tensor whose first sample was all zeros: its unit is the first shard's that saw other values;
    # shards that fixed another one are observed again with it (then every unit is known).
    for name in tensors:
        if name not in units:
            unit = next((u for part in found if (u := histogram_unit(part[0][name])) is not None), None)
            if unit is not None:
                units[name] = unit
    again = [index for index, part in enumerate(found)
             if any(histogram_unit(part[0][name]) not in (None, units.get(name)) for name in tensors)]
    if again:
        redo = replace(plan, units=units)
        for index, result in zip(again, _observe(executor, redo, iter([shards[i] for i in again]), None, total)):
            found[index] = result
    merged = {name: merge_shards(firsts[name], [part[0][name] for part in found]) for name in tensors}
    done = 1 + sum(part[1] for part in found)
    for part in found:
        notes += [line for line in part[2] if line not in notes]
    ranges = {name: TensorRange(float(merged[name].result().lo), float(merged[name].result().hi), specs[name].method,
                                merged[name].summary()) for name in tensors}
    return CalibrationTable(ranges, done, batching=batching_of(data, passes.per_run, spec.batch_size, notes))


def _observe(executor, plan: ShardPlan, shards: Iterator[tuple[int, object]], progress: Progress | None,
             total: int | None) -> list[tuple[dict, int, list[str]]]:
    """Each shard's (observers, samples, notes), in data order; tasks start as `shards` yields them."""
    results: dict[int, tuple] = {}  # by the shard's first sample
    done = 1
    shared = executor.put(plan)
    for task, result in executor.map_unordered(observe_shard, ((shared, offset, ref) for offset, ref in shards)):
        if isinstance(result, LostTask):
            raise WorkerError(f"a calibration shard (samples from {task[1]}) was lost after Ray's retries: "
                              f"{result.reason}")
        results[task[1]] = result
        done += result[1]
        if progress:
            progress(done, max(total or 0, done))
    return [results[offset] for offset in sorted(results)]


def calibrate_with(executor: str, address: str | None, model: ModelProto, tensors: list[str], data: DataSource,
                   spec: CalibrationSpec, qtype: QType, symmetric: bool, progress: Progress | None = None,
                   hessian_inputs: dict | None = None) -> CalibrationTable:
    """`calibrate` here (`executor` "local"), or sharded over Ray tasks ("ray": the cluster at
    `address`, default RAY_ADDRESS, else a local instance). gptq's Hessians are float sums whose
    last bits would follow the sharding: with them the calibration stays here, and a note says so.
    Raises UsageError for --ray-address without ray, or ray not installed."""
    if executor not in ("local", "ray"):
        raise UsageError(f"unknown executor {executor!r}; allowed: local, ray")
    stateful = getattr(data, "state", None) is not None
    if executor == "local" or hessian_inputs or stateful:
        if executor == "local" and address is not None:
            raise UsageError("--ray-address needs --executor ray")
        table = calibrate(model, tensors, data, spec, qtype, symmetric, progress, hessian_inputs)
        if executor == "ray":
            why = ("data.state: a stream's chunks run in order, each fed the state the one before returned"
                   if stateful else "weights.rounding gptq sums Hessians, which shards would change")
            table = replace(table, notes=[*table.notes, f"calibration ran in this process, not on Ray: {why}"])
        return table
    with RayExecutor(address) as pool:
        return calibrate_sharded(model, tensors, data, spec, qtype, symmetric, pool, progress)
