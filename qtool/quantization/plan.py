"""Decide what gets quantized, and how, before anything touches the graph.

`select_tensors` runs before calibration (which tensors need a range);
`build_plan` turns the selection plus calibrated ranges into a QuantPlan:
plain data that the report shows and `qdq.apply_plan` carries out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from onnx import ModelProto, TensorProto

from qtool.calibration.calibrate import CalibrationTable
from qtool.calibration.hessians import Im2Col, hessian_inputs
from qtool.errors import ModelError
from qtool.io.model import DEFAULT_DOMAINS, GraphIndex, opset_version
from qtool.numerics import BLOCKED_MIN_OPSET, QTYPES, is_sane_scale, scale_zero_point
from qtool.quantization.coverage import drop_rangeless
from qtool.quantization.dynamic import (DYNAMIC_KERNELS, DynamicQuant, absorb_bias_add, describe, dynamic_quant,
                                        dynamic_refusal)
from qtool.quantization.fusions import decomposed_layer_norms
from qtool.quantization.joins import joins_to_split
from qtool.quantization.masks import SOFTMAX_FLOOR, softmax_only
from qtool.quantization.precedence import resolve_settings, settings_reason
from qtool.quantization.rules import FLOAT_OUTPUT_KERNELS, RULES, OpRule, activation_inputs
from qtool.quantization.weights import BiasQuant, ConstantQuant, NBitsQuant, quantize_constants, weights_reduce_range
from qtool.recipe import patterns
from qtool.recipe.schema import ActivationSpec, Recipe, WeightSpec


@dataclass(frozen=True)
class ActivationQuant:
    tensor: str
    qtype: str
    symmetric: bool
    range_of: str  # tensor whose calibrated range sets the scale (itself, or a shared source)
    scale: float = 0.0
    zero_point: int = 0


@dataclass(frozen=True)
class NodeDecision:
    node: str
    op_type: str
    quantized: bool
    reason: str
    activation_inputs: tuple[int, ...] = ()
    weight_input: int | None = None
    bias_input: int | None = None
    activations: ActivationSpec | None = None  # resolved settings (defaults + overrides)
    weights: WeightSpec | None = None
    weight_only: str | None = None  # "matmulnbits" or "qdq" when quantization.weight_only took the node
    dynamic: str | None = None  # the ONNX Runtime kernel, when mode dynamic took the node (quantization/dynamic.py)
    tensors: tuple[tuple[str, str], ...] = ()  # (tensor, what it got), filled by build_plan


@dataclass(frozen=True)
class Selection:
    nodes: list[NodeDecision]
    activations: dict[str, ActivationQuant]
    notes: list[str] = field(default_factory=list)
    # gptq rounding: node -> (the weight's input tensor, how the weight meets it), for calibration
    hessian_inputs: dict[str, tuple[str, Im2Col]] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)  # the `keep_float` it was selected with

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
    nbits: dict[str, NBitsQuant] = field(default_factory=dict)  # by node name
    qdq_domain_16bit: str = ""  # "com.microsoft" where the model's opset predates 16-bit Q/DQ
    dynamic: dict[str, DynamicQuant] = field(default_factory=dict)  # by node name


def tensor_types(model: ModelProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every initializer and typed value, by name."""
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type"):
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def _float_decision(node, reason: str) -> NodeDecision:
    return NodeDecision(node.name, node.op_type, False, reason)


def _has_subgraph(node) -> bool:
    return any(attr.HasField("g") or attr.graphs for attr in node.attribute)


def subgraph_reads(node) -> set[str]:
    """Outer-scope names the node's bodies (If/Loop/Scan) read, at any depth."""
    reads: set[str] = set()
    for attr in node.attribute:
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            defined = {v.name for v in body.input} | {t.name for t in body.initializer}
            defined |= {out for inner in body.node for out in inner.output}
            used = {name for inner in body.node for name in inner.input if name}
            for inner in body.node:
                used |= subgraph_reads(inner)
            reads |= used - defined
    return reads


def _weight_only_decision(node, recipe: Recipe, index: GraphIndex, types: dict) -> NodeDecision | None:
    """None for a node weight_only does not take and static quantization still may."""
    spec = recipe.quantization.weight_only
    if spec is None or node.op_type not in spec.op_types or len(node.input) < 2:
        return None
    weight = node.input[1]
    why = ("weight is not a constant" if weight not in index.initializers
           else "weight is not float32" if types.get(weight) != TensorProto.FLOAT
           else f"weight is not 2-D ({len(index.initializers[weight].dims)}-D)"
           if len(index.initializers[weight].dims) != 2 else None)
    if why is not None:
        return None if recipe.quantization.static else _float_decision(node, f"weight_only {spec.format}: {why}")
    return NodeDecision(node.name, node.op_type, True, f"weight_only {spec.format} (quantization.weight_only)",
                        (), 1, None, weight_only=spec.format)


def _decide(node, rule: OpRule | None, recipe: Recipe, index: GraphIndex, types: dict) -> NodeDecision:
    quant = recipe.quantization
    exclude = quant.exclude
    if node.op_type in exclude.op_types:
        return _float_decision(node, "excluded: quantization.exclude.op_types")
    for pattern in exclude.nodes:
        if patterns.fullmatch(pattern, node.name):
            return _float_decision(node, f"excluded: quantization.exclude.nodes {pattern!r}")
    if node.domain not in DEFAULT_DOMAINS:
        return _float_decision(node, "op type not in the rule table")
    if _has_subgraph(node):
        return _float_decision(node, "has a subgraph (its bodies stay float)")
    settings = resolve_settings(node, quant)
    if settings.float_by:
        return _float_decision(node, f"float: {settings.float_by}")
    weight_only = _weight_only_decision(node, recipe, index, types)
    if weight_only is not None:
        return weight_only
    if settings.mode == "dynamic":
        refusal = dynamic_refusal(node, index, types)
        if refusal is not None:
            return _float_decision(node, refusal)
        return NodeDecision(node.name, node.op_type, True, f"mode dynamic{settings_reason(settings)}",
                            activations=settings.activations, weights=settings.weights,
                            dynamic=DYNAMIC_KERNELS[node.op_type])
    if rule is None:
        return _float_decision(node, "op type not in the rule table")
    if not quant.static:
        return _float_decision(node, "quantization.static is false")
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
    wide = settings.weights.granularity == "per_block" or QTYPES[settings.weights.dtype].bits > 8 \
        or QTYPES[settings.activations.dtype].bits > 8  # no integer kernel: keep the bias float
    if (rule.bias is not None and weight is not None and len(node.input) > rule.bias and not wide
            and node.input[rule.bias] in index.initializers and 0 in inputs):
        bias = rule.bias
    if not inputs and weight is None and not rule.fuses_into_producer:
        return _float_decision(node, "no float inputs to quantize")
    if rule.fuses_into_producer and not is_float(node.output[0]):
        return _float_decision(node, "no float inputs to quantize")
    return NodeDecision(node.name, node.op_type, True, f"rule {node.op_type}{settings_reason(settings)}",
                        inputs, weight, bias, settings.activations, settings.weights)


def reads_quantized(decision: NodeDecision) -> bool:
    """A node the static rules quantize (a dynamic kernel reads float and quantizes it itself)."""
    return decision.quantized and not decision.dynamic


def select_tensors(model: ModelProto, recipe: Recipe, keep_float: dict[str, str] | None = None) -> Selection:
    """Per-node decisions and the activation tensors that need a calibrated range.

    An activation read by several nodes takes the settings of its first
    quantized reader (else of its producer); a data-movement output takes its
    source's, so ONNX Runtime can keep the data integer through it. `keep_float`
    (node -> why) keeps those nodes float: calibrated ranges ruled them out, or the placement pass did.
    """
    graph = model.graph
    index = GraphIndex(graph)
    types = tensor_types(model)
    kept_float = keep_float
    keep_float = {**decomposed_layer_norms(graph), **(keep_float or {})}
    decisions = [_float_decision(node, keep_float[node.name]) if node.name in keep_float
                 else _decide(node, RULES.get(node.op_type), recipe, index, types) for node in graph.node]
    by_output = {node.output[0]: (node, d) for node, d in zip(graph.node, decisions) if node.output}
    position = {id(node): i for i, node in enumerate(index.graph.node)}
    implicit: dict[str, list[str]] = {}  # outer tensor -> nodes whose subgraphs read it
    notes: list[str] = []
    for node in graph.node:
        if _has_subgraph(node):
            reads = sorted(subgraph_reads(node))
            for name in reads:
                implicit.setdefault(name, []).append(node.name)
            shown = ", ".join(reads[:5]) + (", ..." if len(reads) > 5 else "")
            notes.append(f"{node.name} ({node.op_type}): subgraph left float; the outer tensors it reads "
                         f"({shown or 'none'}) reach it with their float values")
    wanted: dict[str, ActivationSpec] = {}

    def range_source(tensor: str) -> str:
        """Outputs of quantized data-movement ops take the range of their input."""
        node, decision = by_output.get(tensor, (None, None))
        if decision is not None and reads_quantized(decision) and RULES[node.op_type].output == "shared" \
                and 0 in decision.activation_inputs and node.input[0] not in index.initializers:
            return range_source(node.input[0])
        return tensor

    for node, decision in zip(graph.node, decisions):
        if decision.quantized:
            for i in decision.activation_inputs:
                if node.input[i] not in index.initializers:
                    wanted.setdefault(node.input[i], decision.activations)
    for node, decision in zip(graph.node, decisions):
        if not reads_quantized(decision) or decision.weight_only or not node.output \
                or types.get(node.output[0]) != TensorProto.FLOAT:
            continue
        out = node.output[0]
        consumers = index.consumers.get(out, [])
        if node.op_type in FLOAT_OUTPUT_KERNELS and (out in index.graph_outputs or (
                consumers and out not in implicit
                and not any(reads_quantized(decisions[position[id(c)]]) for c in consumers))):
            continue  # MatMulIntegerToFloat/QGemm write float for float readers: a Q/DQ pair would only round
        if not consumers and out not in index.graph_outputs:
            continue
        if RULES[node.op_type].output == "shared" and not any(
            reads_quantized(decisions[position[id(c)]]) for c in consumers
        ):
            continue  # moving quantized data only helps if someone reads it quantized
        # A reader inside a subgraph is a float reader: the producer's output is never fused away.
        fused = consumers and out not in index.graph_outputs and out not in implicit and all(
            reads_quantized(by_output[c.output[0]][1]) and RULES[c.op_type].fuses_into_producer
            for c in consumers if c.output and c.output[0] in by_output
        ) and all(c.output and c.output[0] in by_output for c in consumers)
        if not fused:
            wanted.setdefault(out, decision.activations)
    activations: dict[str, ActivationQuant] = {}
    for tensor, spec in wanted.items():
        source = range_source(tensor)
        spec = wanted.get(source, spec)
        activations[tensor] = ActivationQuant(tensor, spec.dtype, spec.symmetric, source)
    return Selection(decisions, activations, notes, hessian_inputs(graph.node, decisions, index.initializers, notes),
                     dict(kept_float or {}))


def required_opset(recipe: Recipe) -> tuple[int, str] | None:
    """The default-domain opset the recipe's types need, and why (None: 13 will do)."""
    quant = recipe.quantization
    dtypes = {quant.activations.dtype, quant.weights.dtype}
    blocked = quant.weights.granularity == "per_block"
    for override in quant.overrides:
        for patch in (override.activations, override.weights):
            if patch is not None and patch.dtype:
                dtypes.add(patch.dtype)
        if override.weights is not None and override.weights.granularity == "per_block":
            blocked = True
    if not quant.static:
        dtypes, blocked = set(), False
    needs = sorted(d for d in dtypes if QTYPES[d].min_opset > 13)
    if quant.weight_only is not None and quant.weight_only.format == "qdq":
        needs.append(f"int{quant.weight_only.bits}")
        blocked = True
    if not needs and not blocked:
        return None
    why = ", ".join(dict.fromkeys(needs)) + (" types" if needs else "")
    why += (" and " if needs and blocked else "") + ("blocked Q/DQ" if blocked else "")
    return BLOCKED_MIN_OPSET, f"{why} need opset {BLOCKED_MIN_OPSET}"


def _describe_activation(quant: ActivationQuant) -> str:
    return f"{quant.qtype} {'symmetric' if quant.symmetric else 'asymmetric'} per_tensor"


def _describe_constant(const: ConstantQuant) -> str:
    if const.axis is None:
        granularity = "per_tensor"
    elif const.block_size:
        granularity = f"per_block {const.block_size} (axis {const.axis})"
    else:
        granularity = f"per_channel (axis {const.axis})"
    return (f"{const.qtype} {'symmetric' if const.symmetric else 'asymmetric'} {granularity}"
            + (", 7-bit (reduce_range)" if const.reduce_range else "")
            + (", gptq rounding" if const.codes is not None else ""))


def _node_tensors(node, decision: NodeDecision, activations, constants, biases, nbits, dynamic) -> tuple:
    """What each input and output of a node got, for the report."""
    got = []
    for i, name in enumerate(node.input):
        if not name:
            continue
        if decision.node in dynamic and i in dynamic[decision.node].weights:
            got.append((name, describe(dynamic[decision.node])))
        elif decision.node in nbits and i == 1:
            q = nbits[decision.node]
            got.append((name, f"MatMulNBits {q.bits}-bit block {q.block_size}"
                              f"{'' if q.zero_point is None else ' with zero points'}"))
        elif name in activations:
            got.append((name, _describe_activation(activations[name])))
        elif decision.quantized and name in constants and (
                i == decision.weight_input or i in decision.activation_inputs):
            got.append((name, _describe_constant(constants[name])))
        elif (decision.node, name) in biases:
            got.append((name, "int32 bias (scale = input scale x weight scale)"))
        else:
            got.append((name, "float"))
    for name in node.output:
        if name:
            got.append((name, _describe_activation(activations[name]) if name in activations else "float"))
    return tuple(got)


def build_plan(
    model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable, saturating_host: bool
) -> QuantPlan:
    """Scales and zero points for every selected tensor; degenerate ones stay float."""
    split = joins_to_split(model.graph, selection.nodes,
                           {name: quant.range_of for name, quant in selection.activations.items()}, table)
    if split:  # needs no range the first selection did not
        selection = select_tensors(model, recipe, {**selection.kept_float, **split})
    index = GraphIndex(model.graph)
    notes: list[str] = list(selection.notes) + [f"{node}: {why}" for node, why in split.items()]
    host_reduce_range = weights_reduce_range(recipe, saturating_host)

    activations: dict[str, ActivationQuant] = {}
    masked = softmax_only(model.graph, selection.nodes)
    for name, quant in selection.activations.items():
        measured = table.ranges.get(quant.range_of)
        if measured is None:
            notes.append(f"{name}: no calibrated range, kept float")
            continue
        lo = measured.lo
        if quant.range_of in masked and lo < SOFTMAX_FLOOR < measured.hi:
            lo = SOFTMAX_FLOOR
            if name == quant.range_of:
                notes.append(f"{name}: read only by Softmax, range [{measured.lo:g}, {measured.hi:g}] clamped at "
                             f"{SOFTMAX_FLOOR:g} (an additive attention mask)")
        scale, zero_point = scale_zero_point(lo, measured.hi, QTYPES[quant.qtype], quant.symmetric)
        if lo == measured.hi or not is_sane_scale(scale):
            notes.append(f"{name}: degenerate range [{measured.lo:g}, {measured.hi:g}], kept float")
            continue
        activations[name] = ActivationQuant(
            name, quant.qtype, quant.symmetric, quant.range_of, float(scale), int(zero_point)
        )

    nodes = drop_rangeless(model.graph, list(selection.nodes), selection.activations, activations)
    hessians = {name: h for name, h in table.hessians.items() if name in selection.hessian_inputs}
    if len(hessians) < len(selection.hessian_inputs):
        notes.append(f"weights.rounding gptq: no input statistics for {len(selection.hessian_inputs) - len(hessians)}"
                     " node(s) (a calibration table carries none: give calibration data); rounded to nearest")
    constants, biases, nbits = quantize_constants(model.graph.node, nodes, index, activations, recipe,
                                                  host_reduce_range, hessians, notes)
    float_nodes = {d.node for d in nodes if not d.quantized}
    dynamic = {node.name: absorb_bias_add(dynamic_quant(node, index, d.weights.granularity != "per_tensor",
                                                        host_reduce_range), node, index, float_nodes)
               for node, d in zip(model.graph.node, nodes) if d.quantized and d.dynamic}
    absorbed = {q.absorbs: name for name, q in dynamic.items() if q.absorbs}
    nodes = [replace(d, reason=f"bias folded into {absorbed[d.node]} (DynamicQuantizeMatMul)")
             if d.node in absorbed else d for d in nodes]
    nodes = [replace(d, tensors=_node_tensors(node, d, activations, constants, biases, nbits, dynamic))
             for node, d in zip(model.graph.node, nodes)]
    qdq_domain = _check_opset(model, activations, constants, notes)
    return QuantPlan(nodes, activations, constants, biases, host_reduce_range, notes, nbits, qdq_domain, dynamic)


def _check_opset(model: ModelProto, activations: dict, constants: dict, notes: list[str]) -> str:
    """16-bit Q/DQ below opset 21 falls back to com.microsoft ops; 4-bit and blocked cannot."""
    opset = opset_version(model)
    if opset >= BLOCKED_MIN_OPSET:
        return ""
    late = {c.qtype for c in constants.values() if QTYPES[c.qtype].min_opset > opset or c.block_size}
    if any(c.block_size for c in constants.values()) or late & {"int4", "uint4"}:
        raise ModelError(f"opset {opset}: 4-bit and blocked Q/DQ need opset {BLOCKED_MIN_OPSET}, "
                         "and the model could not be upgraded")
    late |= {a.qtype for a in activations.values() if QTYPES[a.qtype].min_opset > opset}
    if late:
        notes.append(f"opset {opset}: {', '.join(sorted(late))} Q/DQ written as com.microsoft "
                     "QuantizeLinear/DequantizeLinear (ONNX Runtime contrib ops)")
        return "com.microsoft"
    return ""
