"""Decide what gets quantized, and how, before anything touches the graph.

`select_tensors` runs before calibration (which tensors need a range);
`build_plan` turns the selection plus calibrated ranges into a QuantPlan:
plain data that the report shows and `qdq.apply_plan` carries out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, numpy_helper

from qtool.calibrate import CalibrationTable
from qtool.model import DEFAULT_DOMAINS, GraphIndex
from qtool.numerics import QTYPES, channel_ranges, is_sane_scale, scale_zero_point
from qtool.recipe import Recipe
from qtool.rules import FLOAT_OUTPUT_KERNELS, RULES, OpRule, activation_inputs


@dataclass(frozen=True)
class ActivationQuant:
    tensor: str
    qtype: str
    symmetric: bool
    range_of: str  # tensor whose calibrated range sets the scale (itself, or a shared source)
    scale: float = 0.0
    zero_point: int = 0


@dataclass(frozen=True)
class ConstantQuant:
    """A float initializer stored as integers plus one DequantizeLinear."""

    tensor: str
    qtype: str
    axis: int | None
    scale: np.ndarray
    zero_point: np.ndarray
    role: str  # "weight" or "constant" (an initializer operand of Add, Mul, ...)


@dataclass(frozen=True)
class BiasQuant:
    tensor: str
    node: str
    activation: str
    weight: str


@dataclass(frozen=True)
class NodeDecision:
    node: str
    op_type: str
    quantized: bool
    reason: str
    activation_inputs: tuple[int, ...] = ()
    weight_input: int | None = None
    bias_input: int | None = None


@dataclass(frozen=True)
class Selection:
    nodes: list[NodeDecision]
    activations: dict[str, ActivationQuant]

    @property
    def calibration_tensors(self) -> list[str]:
        return sorted({quant.range_of for quant in self.activations.values()})


@dataclass(frozen=True)
class QuantPlan:
    nodes: list[NodeDecision]
    activations: dict[str, ActivationQuant]
    constants: dict[str, ConstantQuant]
    biases: dict[tuple[str, str], BiasQuant]
    reduce_range: bool
    notes: list[str] = field(default_factory=list)


def _tensor_types(model: ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def _float_decision(node, reason: str) -> NodeDecision:
    return NodeDecision(node.name, node.op_type, False, reason)


def _decide(node, rule: OpRule | None, recipe: Recipe, index: GraphIndex, types: dict) -> NodeDecision:
    exclude = recipe.quantization.exclude
    if node.domain not in DEFAULT_DOMAINS or rule is None:
        return _float_decision(node, "op type not in the rule table")
    if node.op_type in exclude.op_types:
        return _float_decision(node, "excluded: quantization.exclude.op_types")
    for pattern in exclude.nodes:
        if re.fullmatch(pattern, node.name):
            return _float_decision(node, f"excluded: quantization.exclude.nodes {pattern!r}")
    if any(attr.HasField("g") or attr.graphs for attr in node.attribute):
        return _float_decision(node, "has a subgraph")
    is_float = lambda name: types.get(name) == TensorProto.FLOAT  # noqa: E731
    weight = None
    if rule.weight is not None and len(node.input) > rule.weight:
        name = node.input[rule.weight]
        if name in index.initializers and is_float(name):
            weight = rule.weight
    inputs = set(activation_inputs(rule, len(node.input)))
    if rule.weight is not None and weight is None and len(node.input) > rule.weight:
        inputs.add(rule.weight)  # a dynamic "weight" (MatMul of two activations)
    inputs = tuple(sorted(i for i in inputs if node.input[i] and is_float(node.input[i]) and i != weight))
    bias = None
    if (rule.bias is not None and weight is not None and len(node.input) > rule.bias
            and node.input[rule.bias] in index.initializers and 0 in inputs):
        bias = rule.bias
    if not inputs and weight is None and not rule.fuses_into_producer:
        return _float_decision(node, "no float inputs to quantize")
    if rule.fuses_into_producer and not is_float(node.output[0]):
        return _float_decision(node, "no float inputs to quantize")
    return NodeDecision(node.name, node.op_type, True, f"rule {node.op_type}", inputs, weight, bias)


def select_tensors(model: ModelProto, recipe: Recipe) -> Selection:
    """Per-node decisions and the activation tensors that need a calibrated range."""
    graph = model.graph
    index = GraphIndex(graph)
    types = _tensor_types(model)
    spec = recipe.quantization.activations
    decisions = [_decide(node, RULES.get(node.op_type), recipe, index, types) for node in graph.node]
    by_output = {node.output[0]: (node, d) for node, d in zip(graph.node, decisions) if node.output}
    position = {id(node): i for i, node in enumerate(index.graph.node)}
    activations: dict[str, ActivationQuant] = {}

    def range_source(tensor: str) -> str:
        """Outputs of quantized data-movement ops take the range of their input."""
        node, decision = by_output.get(tensor, (None, None))
        if decision is not None and decision.quantized and RULES[node.op_type].output == "shared" \
                and 0 in decision.activation_inputs and node.input[0] not in index.initializers:
            return range_source(node.input[0])
        return tensor

    def add(tensor: str) -> None:
        activations.setdefault(tensor, ActivationQuant(tensor, spec.dtype, spec.symmetric, range_source(tensor)))

    for node, decision in zip(graph.node, decisions):
        if not decision.quantized:
            continue
        for i in decision.activation_inputs:
            if node.input[i] not in index.initializers:
                add(node.input[i])
    for node, decision in zip(graph.node, decisions):
        if not decision.quantized or not node.output or types.get(node.output[0]) != TensorProto.FLOAT:
            continue
        out = node.output[0]
        consumers = index.consumers.get(out, [])
        if out in index.graph_outputs and node.op_type in FLOAT_OUTPUT_KERNELS:
            continue
        if not consumers and out not in index.graph_outputs:
            continue
        if RULES[node.op_type].output == "shared" and not any(
            decisions[position[id(c)]].quantized for c in consumers
        ):
            continue  # moving quantized data only helps if someone reads it quantized
        fused = consumers and out not in index.graph_outputs and all(
            by_output[c.output[0]][1].quantized and RULES[c.op_type].fuses_into_producer
            for c in consumers if c.output and c.output[0] in by_output
        ) and all(c.output and c.output[0] in by_output for c in consumers)
        if not fused:
            add(out)
    return Selection(decisions, activations)


def weights_reduce_range(recipe: Recipe, saturating_host: bool) -> bool:
    setting = recipe.quantization.weights.reduce_range
    return saturating_host if setting == "auto" else bool(setting)


def _weight_axis(node, rule: OpRule, weight: np.ndarray) -> int:
    if rule.weight_axis == "gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return int(rule.weight_axis) % weight.ndim


def build_plan(
    model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable, saturating_host: bool
) -> QuantPlan:
    """Scales and zero points for every selected tensor; degenerate ones stay float."""
    index = GraphIndex(model.graph)
    notes: list[str] = []
    act_spec, w_spec = recipe.quantization.activations, recipe.quantization.weights
    act_qtype = QTYPES[act_spec.dtype]
    reduce_range = weights_reduce_range(recipe, saturating_host)

    activations: dict[str, ActivationQuant] = {}
    for name, quant in selection.activations.items():
        measured = table.ranges.get(quant.range_of)
        if measured is None:
            notes.append(f"{name}: no calibrated range, kept float")
            continue
        scale, zero_point = scale_zero_point(measured.lo, measured.hi, act_qtype, act_spec.symmetric)
        if measured.lo == measured.hi or not is_sane_scale(scale):
            notes.append(f"{name}: degenerate range [{measured.lo:g}, {measured.hi:g}], kept float")
            continue
        activations[name] = ActivationQuant(
            name, quant.qtype, quant.symmetric, quant.range_of, float(scale), int(zero_point)
        )

    constants: dict[str, ConstantQuant] = {}
    biases: dict[tuple[str, str], BiasQuant] = {}
    nodes = list(selection.nodes)
    for node, decision in zip(model.graph.node, nodes):
        if not decision.quantized:
            continue
        rule = RULES[node.op_type]
        if decision.weight_input is not None:
            name = node.input[decision.weight_input]
            array = numpy_helper.to_array(index.initializers[name])
            axis = _weight_axis(node, rule, array) if w_spec.granularity == "per_channel" else None
            if name not in constants:
                lo, hi = channel_ranges(array, axis)
                scale, zero_point = scale_zero_point(lo, hi, QTYPES[w_spec.dtype], w_spec.symmetric, reduce_range)
                constants[name] = ConstantQuant(name, w_spec.dtype, axis, scale, zero_point, "weight")
        for i in decision.activation_inputs:
            name = node.input[i]
            if name in index.initializers and name not in constants:
                array = numpy_helper.to_array(index.initializers[name])
                lo, hi = channel_ranges(array, None)
                scale, zero_point = scale_zero_point(lo, hi, act_qtype, act_spec.symmetric)
                constants[name] = ConstantQuant(name, act_spec.dtype, None, scale, zero_point, "constant")
        if decision.bias_input is not None:
            bias = node.input[decision.bias_input]
            weight = node.input[decision.weight_input]
            bias_shape = tuple(index.initializers[bias].dims)
            channels = constants[weight].scale.size
            # Every rule's weight axis is its output-channel axis, which the bias follows.
            if node.input[0] in activations and len(bias_shape) == 1 and channels in (1, bias_shape[0]):
                biases[(node.name, bias)] = BiasQuant(bias, node.name, node.input[0], weight)
    return QuantPlan(nodes, activations, constants, biases, reduce_range, notes)
