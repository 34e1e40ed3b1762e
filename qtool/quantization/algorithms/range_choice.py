"""`calibration.method: auto`: per tensor, the clipping range whose quantization disturbs the tensor's readers least.

Calibrating with method auto keeps one histogram per tensor and reads candidate ranges from it
(minmax, percentiles of |x|, the mse optimum: qtool.calibration.observers.CandidateObserver). One
streaming pass of a measuring model scores them all: the model quantized with the minmax ranges (so
every reader sees its upstream quantized, in network order) plus, per quantized tensor T and
distinct candidate c, a branch Q_c/DQ_c(T) -> a copy of each reader of T (its other inputs, weights
included, as the plan quantizes them) -> the sum of squared differences from that reader run on T
unquantized, over the sum of squares of the latter (for the planned minmax parameters the reader
itself serves). A tensor's score is that relative error summed over its readers (and over the
tensors that share its range); the least wins, minmax on a tie (candidates that give the same scale
and zero point are one, the first named). The idea is AdaQuant's and NNCF's per-layer range search
(minimise the layer output's error rather than the tensor's own), done for all tensors in one pass.
Deterministic: the same model, recipe and data choose the same ranges. Cost: per reader, one float
copy and one copy per distinct candidate (on ppocr_det ~10x a float pass of user CPU; README).
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
SCORED_SAMPLES = 32  # the scoring pass reads at most this many calibration samples: its cost stays bounded
# One sample per scoring run: the branches hold several copies of every reader's output. On ppocr_det
# (24 samples, 320x320) peak RSS 1.18 GB with runs of 8, 0.46 GB (as minmax calibration) with runs of
# one, 6 % less CPU time; it chose the same ranges.
SCORING_BATCH = 1
# A tensor whose minmax range is this many times its p99.99 one is an outlier tensor: the report names it
# and the range it kept (the candidates are how auto handles it).
OUTLIER_RATIO = 8.0


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
        self.energies: dict[tuple, object] = {}  # per reader: its float copy's outputs, their energies

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.index.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, at: int, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.index.unique_name(base)
        self.after.setdefault(at, []).append(
            helper.make_node(op, inputs, [out], name=self.index.unique_name(f"{out}_{op}"), **attrs))
        return out

    def square_sum(self, at: int, a: str, b: str | None, base: str) -> str:
        """A graph output: the sum of (a - b)^2 (of a^2 without b) over every element."""
        diff = self.node(at, "Sub", [a, b], f"{base}.diff") if b else a
        total = self.node(at, "ReduceSumSquare", [diff], f"{base}.sum", keepdims=0)
        self.graph.output.append(helper.make_empty_tensor_value_info(total))
        return total

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


def _planned(build: _Builder, q, params) -> bool:
    """Whether q already quantizes with these parameters (its readers' outputs then score them as they are)."""
    scale, zero_point = params
    found = [build.index.initializers.get(name) for name in q.input[1:3]]
    return all(found) and len(found) == 2 and float(numpy_helper.to_array(found[0])) == float(scale) \
        and int(numpy_helper.to_array(found[1])) == int(zero_point)


def _branches(build: _Builder, position: dict, key: Key, q, dequantized: str, params) -> None:
    """Q_c/DQ_c of the tensor q quantizes, each reader copied onto it (or, for the planned parameters,
    the reader itself), and the error outputs."""
    scale, zero_point = params
    readers = [node for node in build.index.consumers.get(dequantized, []) if not _has_subgraph(node)]
    float_value = q.input[0]
    tag = f"range_choice.{key[1]}"
    at0 = position[id(build.index.producer[float_value])] if float_value in build.index.producer else -1
    planned = _planned(build, q, params)
    if planned:
        value = dequantized
    else:
        s = build.constant(f"{float_value}.{tag}.scale", np.asarray(scale, np.float32))
        z = build.constant(f"{float_value}.{tag}.zero_point", np.asarray(zero_point))
        codes = build.node(at0, "QuantizeLinear", [float_value, s, z], f"{float_value}.{tag}.q")
        build.after[at0][-1].domain = q.domain
        value = build.node(at0, "DequantizeLinear", [codes, s, z], f"{float_value}.{tag}.dq")
        build.after[at0][-1].domain = q.domain
    if dequantized in build.index.graph_outputs:  # read by the user: the value itself is scored
        energy = build.energies.get((at0, id(q)))
        if energy is None:
            energy = build.energies[(at0, id(q))] = build.square_sum(at0, float_value, None, f"{float_value}.energy")
        build.errors.append((key, build.square_sum(at0, value, float_value, f"{float_value}.{tag}.error"), energy))
    for reader in readers:
        at = position[id(reader)]
        reference = build.energies.get((at, id(q), "ref"))
        if reference is None:  # the reader on the unquantized value: once per reader, for every candidate
            reference = build.energies[(at, id(q), "ref")] = build.copy_reader(
                at, reader, dequantized, float_value, "range_choice.float")
        outputs = list(reader.output) if planned else build.copy_reader(at, reader, dequantized, value, tag)
        for j, (original, ours, ref) in enumerate(zip(reader.output, outputs, reference)):
            if not original or build.types.get(original) != TensorProto.FLOAT:
                continue
            energy = build.energies.get((at, id(q), j))
            if energy is None:
                energy = build.energies[(at, id(q), j)] = build.square_sum(at, ref, None, f"{ref}.energy")
            build.errors.append((key, build.square_sum(at, ours, ref, f"{ref}.{tag}.error"), energy))


def score_ranges(float_model: ModelProto, quantized: ModelProto, plan: QuantPlan,
                 candidates: dict[str, dict[str, list[float]]], data: DataSource,
                 batch_size: int) -> dict[str, dict[str, float]]:
    """Per calibrated tensor, per distinct candidate: the summed relative squared error of its readers'
    outputs over `data` (inf where a branch gave non-finite values). Candidates absent alias an earlier one."""
    model, errors = measuring_model(float_model, quantized, plan, candidates)
    if not errors:
        return {}
    session = make_session(model, optimize=False)
    sums: dict[str, float] = {}
    for _, results in measured(session, quantized, data, batch_size):
        for _, error, energy in errors:
            for name in (error, energy):
                sums[name] = sums.get(name, 0.0) + float(results[name])
    scores: dict[str, dict[str, float]] = {}
    for (source, name), error, energy in errors:
        relative = sums[error] / sums[energy] if sums[energy] > 0 else (0.0 if sums[error] == 0 else math.inf)
        relative = relative if math.isfinite(relative) else math.inf
        per = scores.setdefault(source, {})
        per[name] = per.get(name, 0.0) + relative
    return scores


def choose_ranges(float_model: ModelProto, quantized: ModelProto, plan: QuantPlan, table: CalibrationTable,
                  data: DataSource, batch_size: int = SCORING_BATCH) -> CalibrationTable:
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
    outliers = {source: {"max_over_p99.99": round(ratio, 2), "chosen": chosen[source]}
                for source in chosen if (ratio := _outlier_ratio(candidates[source])) >= OUTLIER_RATIO}
    choice = {"per": "tensor", "candidates": names, "chosen": dict(sorted(chosen.items())),
              "wins": {name: wins.get(name, 0) for name in names}, "outliers": outliers,
              "measured_on": "calibration data"}
    summary = ", ".join(f"{name} {count}" for name, count in choice["wins"].items() if count)
    clipped = sum(entry["chosen"] != "minmax" for entry in outliers.values())
    note = (f"calibration.method auto chose per tensor ({len(chosen)} tensors): {summary or 'none'}; "
            f"{len(outliers)} outlier tensor(s) (max |x| >= {OUTLIER_RATIO:g}x its p99.99), {clipped} of them clipped")
    return replace(table, ranges=ranges, method_choice=choice, notes=[*table.notes, note])


def _outlier_ratio(offered: dict[str, list[float]]) -> float:
    """max |x| over the p99.99 of |x| (1 where either is missing or zero)."""
    top = max(map(abs, offered["minmax"]))
    tail = max(map(abs, offered.get("p99.99", offered["minmax"])))
    return top / tail if tail > 0 else 1.0


def per_tensor_ranges(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                      saturating_host: bool, data: DataSource) -> CalibrationTable:
    """`choose_ranges` for a table calibrated with method auto: quantizes `model` as `quantize` would
    (placement included) from the minmax candidates, then scores every candidate on the first
    SCORED_SAMPLES samples of `data`."""
    placed = plan_and_apply(model, recipe, selection, table, saturating_host)
    scored = data.reopen(min(data.limit or SCORED_SAMPLES, SCORED_SAMPLES))
    return choose_ranges(model, placed.model, placed.plan, table, scored, SCORING_BATCH)
