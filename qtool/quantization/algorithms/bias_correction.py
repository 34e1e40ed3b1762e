"""Bias correction: remove the per-channel shift of a layer's output mean that weight rounding causes.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.2,
in its empirical form: with ε = dequantized weight − float weight, a layer's output mean moves by
E[conv(x̃, ε)] per output channel, x̃ the layer's input in the quantized model (upstream weights and
activations quantized). One streaming pass of the quantized model, with that term added per layer
as a branch reduced to one mean per channel, measures every layer's shift; the float bias minus it
is quantized in its place. Memory: the model plus one run's tensors; the shifts are [C] vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.data import DataFolder
from qtool.io.model import GraphIndex, opset_version
from qtool.quantization.algorithms.streaming import measured
from qtool.quantization.prepare import remove_unused_initializers
from qtool.runtime.session import make_session

OP_TYPES = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class BiasShift:
    node: str
    op_type: str
    channels: int
    max_abs_shift: float  # of the correction subtracted from the bias
    mean_abs_shift: float
    bias_added: bool  # the layer had no bias: one was added to carry the correction


def _targets(model: ModelProto, plan) -> list[tuple[object, object]]:
    """(node, decision) of the quantized layers with a quantized constant weight, in graph order."""
    return [(node, decision) for node, decision in zip(model.graph.node, plan.nodes)
            if decision.quantized and node.op_type in OP_TYPES and decision.weight_input is not None
            and node.input[decision.weight_input] in plan.constants]


def _attribute(node, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _measuring_model(float_model: ModelProto, quantized: ModelProto, targets) -> tuple[ModelProto, list[str]]:
    """The quantized model plus, per target, mean over all but axis 1 of node(x̃, ε): its outputs."""
    measuring = ModelProto()
    measuring.CopyFrom(quantized)
    graph = measuring.graph
    index = GraphIndex(graph)
    floats = GraphIndex(float_model.graph).initializers
    by_name = {node.name: node for node in graph.node}
    new_axes = opset_version(measuring) >= 18  # ReduceMean's axes became an input
    outputs = []
    for node, decision in targets:
        q_node = by_name[node.name]
        weight = tensor_array(floats[node.input[decision.weight_input]])
        float_name = index.unique_name(f"{node.name}.bias_correction.weight")
        graph.initializer.append(numpy_helper.from_array(weight, float_name))
        error = index.unique_name(f"{node.name}.bias_correction.error")
        branch = index.unique_name(f"{node.name}.bias_correction.output")
        mean = index.unique_name(f"{node.name}.bias_correction.mean")
        rank = 2 if node.op_type == "Gemm" else weight.ndim
        axes = [0, *range(2, rank)]
        attributes = {a.name: helper.get_attribute_value(a) for a in q_node.attribute if a.name != "beta"}
        nodes = [
            helper.make_node("Sub", [q_node.input[decision.weight_input], float_name], [error],
                             name=index.unique_name(f"{error}_Sub")),
            helper.make_node(node.op_type, [q_node.input[0], error], [branch],
                             name=index.unique_name(f"{branch}_{node.op_type}"), **attributes),
        ]
        if new_axes:
            axes_name = index.unique_name(f"{mean}.axes")
            graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            nodes.append(helper.make_node("ReduceMean", [branch, axes_name], [mean], keepdims=0,
                                          name=index.unique_name(f"{mean}_ReduceMean")))
        else:
            nodes.append(helper.make_node("ReduceMean", [branch], [mean], axes=axes, keepdims=0,
                                          name=index.unique_name(f"{mean}_ReduceMean")))
        graph.node.extend(nodes)
        graph.output.append(helper.make_empty_tensor_value_info(mean))
        outputs.append(mean)
    return measuring, outputs


def measure_shifts(float_model: ModelProto, quantized: ModelProto, plan, data: DataFolder,
                   batch_size: int) -> dict[str, np.ndarray]:
    """Per target node, E[node(x̃, ε)] per output channel over the data (float64)."""
    targets = _targets(float_model, plan)
    if not targets:
        return {}
    measuring, outputs = _measuring_model(float_model, quantized, targets)
    session = make_session(measuring, optimize=False)
    names = [node.name for node, _ in targets]
    sums: dict[str, np.ndarray] = {}
    seen = 0
    for count, results in measured(session, quantized, data, batch_size):
        for name, output in zip(names, outputs):
            value = results[output].astype(np.float64) * count
            sums[name] = sums[name] + value if name in sums else value
        seen += count
    return {name: total / max(seen, 1) for name, total in sums.items()}


def correct_biases(float_model: ModelProto, quantized: ModelProto, plan, data: DataFolder,
                   batch_size: int) -> tuple[ModelProto, list[BiasShift]]:
    """A copy of the float model whose quantized layers' biases absorb their measured shifts."""
    shifts = measure_shifts(float_model, quantized, plan, data, batch_size)
    corrected = ModelProto()
    corrected.CopyFrom(float_model)
    index = GraphIndex(corrected.graph)
    changes = []
    for node in corrected.graph.node:
        shift = shifts.get(node.name)
        if shift is None or not np.all(np.isfinite(shift)):
            continue
        beta = float(_attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias:
            bias = tensor_array(index.initializers[node.input[2]]).astype(np.float64)
            if bias.shape not in ((shift.size,), (1,), ()) or beta == 0.0:
                continue
        else:
            bias = np.zeros(shift.size)
        new_bias = (np.broadcast_to(bias, shift.shape) - shift / beta).astype(np.float32)
        name = index.unique_name(f"{node.name}.corrected_bias")
        corrected.graph.initializer.append(numpy_helper.from_array(new_bias, name))
        if len(node.input) > 2:
            node.input[2] = name
        else:
            node.input.append(name)
        changes.append(BiasShift(node.name, node.op_type, int(shift.size), float(np.abs(shift).max()),
                                 float(np.abs(shift).mean()), not has_bias))
    remove_unused_initializers(corrected)
    return corrected, changes


def requantize(float_model: ModelProto, quantized: ModelProto, plan, data: DataFolder, batch_size: int,
               replan: Callable[[ModelProto], tuple[object, ModelProto]]
               ) -> tuple[ModelProto, object, ModelProto, list[BiasShift]]:
    """Measure the shifts of `quantized` (made from `float_model` by `plan`), correct the biases, and
    plan and apply again through `replan` (the caller's planning, placement included): (corrected
    float model, plan, quantized model, what changed per layer)."""
    corrected, changes = correct_biases(float_model, quantized, plan, data, batch_size)
    if not changes:
        return float_model, plan, quantized, changes
    plan, model = replan(corrected)
    return corrected, plan, model, changes
