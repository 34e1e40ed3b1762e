"""Carry out a QuantPlan: the only code that inserts QuantizeLinear/DequantizeLinear.

Weights and constants are stored as integers behind one DequantizeLinear;
each planned activation gets one Q/DQ pair right after its producer, and only
the consumers the plan quantizes read the dequantized value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from qtool.model import GraphIndex
from qtool.numerics import QTYPES, quantize
from qtool.plan import QuantPlan
from qtool.prepare import remove_unused_initializers


class PlanViolation(RuntimeError):
    """The quantized graph does not satisfy the plan: a bug, not a user error."""


def apply_plan(model: ModelProto, plan: QuantPlan) -> ModelProto:
    """Return a new model with the plan's Q/DQ nodes; the input is not modified."""
    quantized = ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    if [node.name for node in graph.node] != [decision.node for decision in plan.nodes]:
        raise PlanViolation("the plan was built for a different graph")
    index = GraphIndex(graph)
    head: list[onnx.NodeProto] = []  # DQ of constants and Q/DQ of graph inputs
    dequantized: dict[str, str] = {}  # float tensor -> the name quantized consumers read

    def add_initializer(name: str, array: np.ndarray) -> str:
        unique = index.unique_name(name)
        graph.initializer.append(numpy_helper.from_array(array, unique))
        return unique

    def dq_node(source: str, scale: str, zero_point: str | None, output: str, axis: int | None) -> onnx.NodeProto:
        kwargs = {"axis": axis} if axis is not None else {}
        inputs = [source, scale] + ([zero_point] if zero_point else [])
        return helper.make_node("DequantizeLinear", inputs, [output],
                                name=index.unique_name(f"{output}_DequantizeLinear"), **kwargs)

    for name, const in plan.constants.items():
        array = numpy_helper.to_array(index.initializers[name])
        q = quantize(array, const.scale, const.zero_point, QTYPES[const.qtype], const.axis)
        q_name = add_initializer(f"{name}_quantized", q)
        scale = add_initializer(f"{name}_scale", _param(const.scale, np.float32))
        zero_point = add_initializer(f"{name}_zero_point", _param(const.zero_point, QTYPES[const.qtype].numpy))
        dequantized[name] = index.unique_name(f"{name}_dequantized")
        head.append(dq_node(q_name, scale, zero_point, dequantized[name], const.axis))

    bias_outputs: dict[tuple[str, str], str] = {}
    for key, bias in plan.biases.items():
        array = numpy_helper.to_array(index.initializers[bias.tensor]).astype(np.float64)
        scale = (plan.activations[bias.activation].scale * plan.constants[bias.weight].scale.astype(np.float64))
        scale = np.broadcast_to(scale, array.shape) if scale.size == 1 and array.size > 1 else scale
        q = np.clip(np.rint(array / scale), -(2**31), 2**31 - 1).astype(np.int32)
        axis = 0 if scale.size > 1 else None
        q_name = add_initializer(f"{bias.tensor}_quantized", q)
        scale_name = add_initializer(f"{bias.tensor}_scale", _param(scale.astype(np.float32), np.float32))
        bias_outputs[key] = index.unique_name(f"{bias.tensor}_dequantized")
        head.append(dq_node(q_name, scale_name, None, bias_outputs[key], axis))  # int32 zero point: 0

    position = {out: i for i, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}  # producer position -> its Q/DQ pairs
    renames: list[tuple[str, str]] = []
    shared_params: dict[tuple, tuple[str, str]] = {}  # tensors that share a range share initializers
    for name, act in plan.activations.items():
        key = (act.range_of, act.qtype, act.scale, act.zero_point)
        if key not in shared_params:
            shared_params[key] = (
                add_initializer(f"{act.range_of}_scale", np.array(act.scale, np.float32)),
                add_initializer(f"{act.range_of}_zero_point", np.array(act.zero_point, QTYPES[act.qtype].numpy)),
            )
        scale, zero_point = shared_params[key]
        source = name
        if name in index.graph_outputs:
            # The graph output keeps its name and becomes the dequantized value.
            source = index.unique_name(f"{name}_float")
            renames.append((name, source))
            dequantized[name] = name
        else:
            dequantized[name] = index.unique_name(f"{name}_dequantized")
        q_out = index.unique_name(f"{name}_quantized")
        pair = [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [q_out],
                             name=index.unique_name(f"{name}_QuantizeLinear")),
            dq_node(q_out, scale, zero_point, dequantized[name], None),
        ]
        if name in position:
            after.setdefault(position[name], []).extend(pair)
        else:
            head.extend(pair)

    for node, decision in zip(graph.node, plan.nodes):
        # Every reader of a quantized activation reads it through Q/DQ, as ORT's
        # fusions require; constants are dequantized only for the nodes that planned it.
        for i, name in enumerate(node.input):
            if name in plan.activations:
                node.input[i] = dequantized[name]
        if not decision.quantized:
            continue
        reads = list(decision.activation_inputs)
        if decision.weight_input is not None:
            reads.append(decision.weight_input)
        for i in reads:
            if node.input[i] in plan.constants:
                node.input[i] = dequantized[node.input[i]]
        key = (node.name, node.input[decision.bias_input]) if decision.bias_input is not None else None
        if key in bias_outputs:
            node.input[decision.bias_input] = bias_outputs[key]
    for old, new in renames:
        _rename_producer(graph, old, new)

    ordered = list(head)
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.ClearField("value_info")  # inferred shapes of the float graph; stale after renames
    remove_unused_initializers(quantized)
    check_postconditions(quantized, plan)
    return quantized


def _param(values: np.ndarray, dtype) -> np.ndarray:
    values = np.asarray(values, dtype=dtype)
    return values.reshape(()) if values.size == 1 else values.reshape(-1)


def _rename_producer(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The node that wrote graph output `old` now writes `new`, which Q/DQ turns back into `old`."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def check_postconditions(model: ModelProto, plan: QuantPlan) -> None:
    """One QuantizeLinear per planned activation, and a model onnx.checker accepts."""
    quantized_inputs = [node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"]
    if len(quantized_inputs) != len(plan.activations) or len(set(quantized_inputs)) != len(quantized_inputs):
        raise PlanViolation(
            f"expected one QuantizeLinear per planned activation ({len(plan.activations)}), "
            f"found {len(quantized_inputs)}"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise PlanViolation(f"quantized model fails onnx.checker: {str(exc).splitlines()[0]}") from None
