"""`calibration.method: auto`: per tensor, the clipping range whose quantization disturbs the tensor's readers least.

Calibrating with method auto keeps one histogram per tensor and reads candidate ranges from it
(minmax, percentiles of |x|, the mse optimum: qtool.calibration.observers.CandidateObserver). One
streaming pass of a measuring model scores them all: the model quantized with the minmax ranges (so
every reader sees its upstream quantized, in network order) plus, per quantized tensor T and
candidate c, a branch Q_c/DQ_c(T) -> a copy of each reader of T (its other inputs, weights included,
as the plan quantizes them) -> the mean squared difference from that reader run on T unquantized,
over the mean square of the latter. A tensor's score is that relative error summed over its readers
(over every tensor that shares its range); the least wins, minmax on a tie (candidates are tried in
order; those that give the same scale and zero point are one). Deterministic: the same model, recipe
and data choose the same ranges. Cost: one run of the quantized model plus, per reader, one float
copy and one per distinct candidate (on ppocr_det ~ 6x a float pass; measured in the README).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.io.model import GraphIndex
from qtool.io.samples import DataSource
from qtool.numerics import QTYPES, is_sane_scale, scale_zero_point
from qtool.quantization.algorithms.streaming import measured
from qtool.quantization.placement import plan_and_apply
from qtool.quantization.plan import QuantPlan, Selection, tensor_types
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session

Key = tuple[str, str]  # (calibrated tensor, candidate name)


def _has_subgraph(node) -> bool:
    return any(attr.HasField("g") or attr.graphs for attr in node.attribute)


def _quantized_pairs(graph) -> dict[str, tuple[object, str]]:
    """Planned activation -> (its QuantizeLinear, the dequantized name its readers read)."""
    q_of = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear"}
    pairs: dict[str, tuple[object, str]] = {}
    outputs = {value.name for value in graph.output}
    for node in graph.node:
        q = q_of.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None:  # a graph output keeps its name on the dequantized side (qdq.apply_plan)
            pairs[node.output[0] if node.output[0] in outputs else q.input[0]] = (q, node.output[0])
    return pairs


class _Builder:
    """Adds the scoring branches to a copy of the quantized model; remembers what each output measures."""

    def __init__(self, quantized: ModelProto, float_types: dict[str, int]):
        self.model = ModelProto()
        self.model.CopyFrom(quantized)
        self.graph = self.model.graph
        self.index = GraphIndex(self.graph)
        self.types = float_types
        self.after: dict[int, list] = {}  # position of a reader -> branch nodes placed right after it
        self.errors: list[tuple[Key, str, str]] = []  # (key, error output, energy output)
        self.energies: dict[tuple[int, int], str] = {}

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.index.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, at: int, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.index.unique_name(base)
        self.after.setdefault(at, []).append(
            helper.make_node(op, inputs, [out], name=self.index.unique_name(f"{out}_{op}"), **attrs))
        return out

    def square_mean(self, at: int, a: str, b: str | None, base: str) -> str:
        diff = self.node(at, "Sub", [a, b], f"{base}.diff") if b else a
        square = self.node(at, "Mul", [diff, diff], f"{base}.square")
        mean = self.node(at, "ReduceMean", [square], f"{base}.mean", keepdims=0)
        self.graph.output.append(helper.make_empty_tensor_value_info(mean))
        return mean

    def copy_reader(self, at: int, reader, replaced: str, by: str, tag: str) -> list[str]:
        outputs = [self.index.unique_name(f"{out}.{tag}") if out else "" for out in reader.output]
        inputs = [by if name == replaced else name for name in reader.input]
        copy = helper.make_node(reader.op_type, inputs, outputs, name=self.index.unique_name(f"{reader.name}.{tag}"),
                                domain=reader.domain)
        copy.attribute.extend(reader.attribute)
        self.after.setdefault(at, []).append(copy)
        return outputs

    def finish(self) -> ModelProto:
        ordered = list(self.after.get(-1, []))  # branches on graph inputs
        for at, node in enumerate(self.graph.node):
            ordered.append(node)
            ordered.extend(self.after.get(at, []))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        return self.model


def _candidate_params(plan: QuantPlan, tensors: list[str], ranges: dict[str, list[float]]
                      ) -> list[tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Per distinct candidate (in order), the scale and zero point each tensor sharing the range would get."""
    seen: set = set()
    found = []
    for name, (lo, hi) in ranges.items():
        params = {}
        for tensor in tensors:
            act = plan.activations[tensor]
            params[tensor] = scale_zero_point(lo, hi, QTYPES[act.qtype], act.symmetric)
        key = tuple((float(s), int(z)) for s, z in params.values())
        if lo == hi or key in seen or not all(is_sane_scale(s) for s, _ in params.values()):
            continue
        seen.add(key)
        found.append((name, params))
    return found


def measuring_model(float_model: ModelProto, quantized: ModelProto, plan: QuantPlan,
                    candidates: dict[str, dict[str, list[float]]]) -> tuple[ModelProto, list[tuple[Key, str, str]]]:
    """The quantized model plus the scoring branches: (model, [(key, error output, energy output)]).
    `candidates`: calibrated tensor -> {candidate: [lo, hi]}."""
    build = _Builder(quantized, tensor_types(float_model))
    pairs = _quantized_pairs(build.graph)
    for tensor, (q, dequantized) in pairs.items():  # a graph output's producer writes a renamed tensor
        if dequantized in build.index.graph_outputs and dequantized in build.types:
            build.types[q.input[0]] = build.types[dequantized]
    position = {id(node): at for at, node in enumerate(build.graph.node)}
    sharing: dict[str, list[str]] = {}
    for name, act in plan.activations.items():
        if act.range_of in candidates and name in pairs:
            sharing.setdefault(act.range_of, []).append(name)
    for source, tensors in sorted(sharing.items()):
        for name, params in _candidate_params(plan, tensors, candidates[source]):
            for tensor in tensors:
                q, dequantized = pairs[tensor]
                _branches(build, position, (source, name), q, dequantized, params[tensor])
    return build.finish(), build.errors


def _branches(build: _Builder, position: dict, key: Key, q, dequantized: str, params) -> None:
    """Q_c/DQ_c of the tensor q quantizes, each reader copied onto it, and the error outputs."""
    scale, zero_point = params
    readers = [node for node in build.index.consumers.get(dequantized, []) if not _has_subgraph(node)]
    float_value = q.input[0]
    tag = f"range_choice.{key[1]}"
    at0 = position[id(build.index.producer[float_value])] if float_value in build.index.producer else -1
    s = build.constant(f"{float_value}.{tag}.scale", np.asarray(scale, np.float32))
    z = build.constant(f"{float_value}.{tag}.zero_point", np.asarray(zero_point))
    codes = build.node(at0, "QuantizeLinear", [float_value, s, z], f"{float_value}.{tag}.q")
    build.after[at0][-1].domain = q.domain
    value = build.node(at0, "DequantizeLinear", [codes, s, z], f"{float_value}.{tag}.dq")
    build.after[at0][-1].domain = q.domain
    if dequantized in build.index.graph_outputs:  # read by the user: the value itself is scored
        energy = build.energies.get((at0, id(q)))
        if energy is None:
            energy = build.energies[(at0, id(q))] = build.square_mean(at0, float_value, None, f"{float_value}.energy")
        build.errors.append((key, build.square_mean(at0, value, float_value, f"{float_value}.{tag}.error"), energy))
    for reader in readers:
        at = position[id(reader)]
        reference = build.energies.get((at, id(q), "ref"))
        if reference is None:  # the reader on the unquantized value: once per reader, for every candidate
            reference = build.energies[(at, id(q), "ref")] = build.copy_reader(
                at, reader, dequantized, float_value, "range_choice.float")
        outputs = build.copy_reader(at, reader, dequantized, value, tag)
        for j, (original, ours, ref) in enumerate(zip(reader.output, outputs, reference)):
            if not original or build.types.get(original) != TensorProto.FLOAT:
                continue
            energy = build.energies.get((at, id(q), j))
            if energy is None:
                energy = build.energies[(at, id(q), j)] = build.square_mean(at, ref, None, f"{ref}.energy")
            build.errors.append((key, build.square_mean(at, ours, ref, f"{ours}.error"), energy))


def score_ranges(float_model: ModelProto, quantized: ModelProto, plan: QuantPlan,
                 candidates: dict[str, dict[str, list[float]]], data: DataSource,
                 batch_size: int) -> dict[str, dict[str, float]]:
    """Per calibrated tensor, per distinct candidate: the summed relative error of its readers' outputs
    (float64; inf where a branch gave non-finite values). Candidates absent alias an earlier one."""
    model, errors = measuring_model(float_model, quantized, plan, candidates)
    if not errors:
        return {}
    session = make_session(model, optimize=False)
    sums: dict[str, float] = {}
    for count, results in measured(session, quantized, data, batch_size):
        for _, error, energy in errors:
            for name in (error, energy):
                sums[name] = sums.get(name, 0.0) + float(results[name]) * count
    scores: dict[str, dict[str, float]] = {}
    for (source, name), error, energy in errors:
        relative = sums[error] / sums[energy] if sums[energy] > 0 else (0.0 if sums[error] == 0 else math.inf)
        relative = relative if math.isfinite(relative) else math.inf
        per = scores.setdefault(source, {})
        per[name] = per.get(name, 0.0) + relative
    return scores


def choose_ranges(float_model: ModelProto, quantized: ModelProto, plan: QuantPlan, table: CalibrationTable,
                  data: DataSource, batch_size: int) -> CalibrationTable:
    """The table with each candidate-carrying tensor's range set to its best-scoring candidate.

    `quantized`: float_model quantized by `plan` from `table` as it is (the minmax candidates).
    Tensors the plan leaves float keep minmax. Each chosen range's summary gains `chosen`; the table's
    `method_choice` says, per tensor, which candidate won, and how many tensors each candidate won.
    """
    planned = {act.range_of for act in plan.activations.values()}  # others (kept float) keep minmax
    candidates = {name: r.summary["candidates"] for name, r in table.ranges.items()
                  if "candidates" in r.summary and name in planned}
    scores = score_ranges(float_model, quantized, plan, candidates, data, batch_size)
    chosen: dict[str, str] = {}
    ranges = dict(table.ranges)
    for source, offered in sorted(candidates.items()):
        measured_scores = scores.get(source, {})
        winner = min(measured_scores, key=lambda name: (measured_scores[name], list(offered).index(name)),
                     default="minmax")
        if not math.isfinite(measured_scores.get(winner, 0.0)):
            winner = "minmax"
        chosen[source] = winner
        lo, hi = offered[winner]
        ranges[source] = TensorRange(float(lo), float(hi), table.ranges[source].method,
                                     {**table.ranges[source].summary, "chosen": winner})
    wins = Counter(chosen.values())
    names = list(next(iter(candidates.values()), {"minmax": None}))
    choice = {"per": "tensor", "candidates": names, "chosen": dict(sorted(chosen.items())),
              "wins": {name: wins.get(name, 0) for name in names}, "measured_on": "calibration data"}
    summary = ", ".join(f"{name} {count}" for name, count in choice["wins"].items() if count)
    note = f"calibration.method auto chose per tensor ({len(chosen)} tensors): {summary or 'none'}"
    return replace(table, ranges=ranges, method_choice=choice, notes=[*table.notes, note])


def per_tensor_ranges(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                      saturating_host: bool, data: DataSource) -> CalibrationTable:
    """`choose_ranges` for a table calibrated with method auto: quantizes `model` as `quantize` would
    (placement included) from the minmax candidates, then scores every candidate on `data`."""
    placed = plan_and_apply(model, recipe, selection, table, saturating_host)
    return choose_ranges(model, placed.model, placed.plan, table, data, recipe.calibration.batch_size)
