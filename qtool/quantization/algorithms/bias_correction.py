"""Bias correction: remove the per-channel shift of a layer's output mean that weight rounding causes.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.2,
in its empirical form: with ε = dequantized weight − float weight, a layer's output mean moves by
E[node(x, ε)] per output channel. x is the layer's input in the *float* model: the shift then depends
on the layer's own weight rounding alone, not on which other layers are quantized, so one
measurement serves every plan that rounds the layer's weight the same way (`qtool tune`'s and
`qtool sensitivity`'s trials read it, and `qtool quantize` with a tuned recipe measures the same
values; a layer promoted to 16-bit activations can get other weights, measured apart). Using x̃, the
quantized input, would add E[node(x̃ − x, ε)], a product of two rounding errors.

One streaming pass of the float model, with node(x, ε) added per layer as a branch reduced to one
mean per sample and channel, gives every layer's shift and its standard error over the samples.
A channel's correction is kept only where its shift is at least `MIN_T` standard errors from zero
(`keep_channels`): a shift within the noise of its own estimate would add that noise to the bias.
Memory: the model plus one run's tensors; the shifts are [C] vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex, node_attribute, opset_version
from qtool.io.samples import DataSource
from qtool.quantization.algorithms.streaming import measured
from qtool.quantization.placement import plan_and_apply
from qtool.quantization.plan import QuantPlan, build_plan, select_tensors
from qtool.quantization.prepare import remove_unused_initializers
from qtool.quantization.qdq import apply_plan
from qtool.runtime.session import make_session

OP_TYPES = ("Conv", "ConvTranspose", "Gemm")
MIN_T = 2.0  # a channel's |shift| / standard error below this: its correction is dropped
NO_DATA = ("quantization.algorithms.bias_correction needs calibration data (--data), not a calibration table: "
           "skipped")


@dataclass(frozen=True)
class LayerShift:
    """What one pass measured for one layer: E[node(x, ε)] per output channel (`mean`, [C] float64),
    its standard error over the `samples` samples (`sem`, [C]; inf with one sample), and the weight
    quantization ε came from (`weight_keys`): it corrects only a weight quantized the same way."""

    node: str
    op_type: str
    mean: np.ndarray
    sem: np.ndarray
    samples: int
    weight: tuple = ()

    def keep_channels(self) -> np.ndarray:
        """[C] bool: the channels whose shift stands out of its noise (|mean| >= MIN_T · sem)."""
        return np.isfinite(self.mean) & (np.abs(self.mean) >= MIN_T * self.sem)


@dataclass(frozen=True)
class BiasShift:
    """One corrected layer, as report.json's `algorithms.bias_correction.layers` lists it."""

    node: str
    op_type: str
    channels: int
    corrected_channels: int  # the rest were dropped: their shift was within MIN_T standard errors of 0
    max_abs_shift: float  # of the correction subtracted from the bias (kept channels)
    mean_abs_shift: float
    dropped_max_abs_shift: float  # the largest shift left uncorrected as noise (0 when none)
    bias_added: bool  # the layer had no bias: one was added to carry the correction


def _targets(model: ModelProto, plan: QuantPlan) -> list[tuple[object, object]]:
    """(node, decision) of the quantized layers with a quantized constant weight, in graph order."""
    return [(node, decision) for node, decision in zip(model.graph.node, plan.nodes)
            if decision.quantized and node.op_type in OP_TYPES and decision.weight_input is not None
            and node.input[decision.weight_input] in plan.constants]


def weight_keys(model: ModelProto, plan: QuantPlan) -> dict[str, tuple]:
    """Per layer `plan` quantizes, how its weight is rounded (type, axis, block, reduce_range, symmetric,
    rounding): two plans giving a layer the same key give it the same ε. They can differ: a layer
    promoted to 16-bit activations gets 8-bit weights where 8-bit activations get 7-bit ones."""
    keys = {}
    for node, decision in _targets(model, plan):
        quant = plan.constants[node.input[decision.weight_input]]
        keys[node.name] = (quant.qtype, quant.axis, quant.block_size, quant.reduce_range, quant.symmetric,
                           quant.codes is None)
    return keys


def weight_errors(float_model: ModelProto, quantized: ModelProto, targets) -> dict[str, np.ndarray]:
    """Per target node, ε = its weight as `quantized` dequantizes it − its float weight (the
    DequantizeLinear feeding it, run alone in ONNX Runtime: int4/8/16, per block, gptq codes alike)."""
    floats = GraphIndex(float_model.graph).initializers
    index = GraphIndex(quantized.graph)
    by_name = {node.name: node for node in quantized.graph.node}
    mini = helper.make_graph([], "weights", [], [])
    wanted: dict[str, str] = {}  # node -> its dequantized weight tensor (shared weights: one tensor)
    for node, decision in targets:
        name = by_name[node.name].input[decision.weight_input]
        producer = index.producer.get(name)
        if producer is None or producer.op_type != "DequantizeLinear" or not all(
                arg in index.initializers for arg in producer.input if arg):
            continue
        if name not in wanted.values():
            mini.node.append(producer)
            mini.initializer.extend(index.initializers[arg] for arg in dict.fromkeys(producer.input)
                                    if arg and arg not in {init.name for init in mini.initializer})
            mini.output.append(helper.make_empty_tensor_value_info(name))
        wanted[node.name] = name
    if not wanted:
        return {}
    names = sorted(set(wanted.values()))
    model = helper.make_model(mini, opset_imports=quantized.opset_import, ir_version=quantized.ir_version)
    values = dict(zip(names, make_session(model, optimize=False).run(names, {})))
    return {node.name: values[wanted[node.name]].astype(np.float32)
            - tensor_array(floats[node.input[decision.weight_input]]).astype(np.float32)
            for node, decision in targets if node.name in wanted}


def _measuring_model(float_model: ModelProto, targets, errors: dict[str, np.ndarray]) -> tuple[ModelProto, dict]:
    """The float model plus, per target, node(x, ε) averaged over all axes but 0 and 1: node -> output."""
    measuring = ModelProto()
    measuring.CopyFrom(float_model)
    graph = measuring.graph
    index = GraphIndex(graph)
    new_axes = opset_version(measuring) >= 18  # ReduceMean's axes became an input
    outputs = {}
    for node, decision in targets:
        if node.name not in errors:
            continue
        error = index.unique_name(f"{node.name}.bias_correction.error")
        graph.initializer.append(numpy_helper.from_array(errors[node.name], error))
        branch = index.unique_name(f"{node.name}.bias_correction.output")
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "beta"}
        graph.node.append(helper.make_node(node.op_type, [node.input[0], error], [branch],
                                           name=index.unique_name(f"{branch}_{node.op_type}"), **attributes))
        rank = 2 if node.op_type == "Gemm" else errors[node.name].ndim
        mean = branch
        if rank > 2:
            mean = index.unique_name(f"{node.name}.bias_correction.mean")
            axes = list(range(2, rank))
            if new_axes:
                axes_name = index.unique_name(f"{mean}.axes")
                graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
                graph.node.append(helper.make_node("ReduceMean", [branch, axes_name], [mean], keepdims=0,
                                                   name=index.unique_name(f"{mean}_ReduceMean")))
            else:
                graph.node.append(helper.make_node("ReduceMean", [branch], [mean], axes=axes, keepdims=0,
                                                   name=index.unique_name(f"{mean}_ReduceMean")))
        graph.output.append(helper.make_empty_tensor_value_info(mean))
        outputs[node.name] = mean
    return measuring, outputs


def has_layers(selection) -> bool:
    """Whether the selection quantizes a layer bias correction corrects (a constant weight's Conv,
    ConvTranspose or Gemm)."""
    return any(d.quantized and d.op_type in OP_TYPES and d.weight_input is not None for d in selection.nodes)


def measure_shifts(float_model: ModelProto, recipe, selection, table, saturating_host: bool, data: DataSource,
                   batch_size: int) -> dict[str, LayerShift]:
    """Per layer the recipe quantizes (Conv, ConvTranspose, Gemm with a constant weight), the shift its
    weight rounding causes on `data`, with its standard error. The weights are quantized as the recipe's
    plan of the whole `selection` does (no placement pass: a layer the placement keeps float in one
    plan may be quantized in another); `table` gives the activation ranges that plan needs."""
    if not has_layers(selection):
        return {}  # no layer to correct: not even a plan to build
    plan = build_plan(float_model, recipe, selection, table, saturating_host)
    targets = _targets(float_model, plan)
    if not targets:
        return {}
    keys = weight_keys(float_model, plan)
    errors = weight_errors(float_model, apply_plan(float_model, plan), targets)
    measuring, outputs = _measuring_model(float_model, targets, errors)
    if not outputs:
        return {}
    session = make_session(measuring, optimize=False)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    seen = 0
    for _, results in measured(session, float_model, data, batch_size):
        for name, output in outputs.items():  # [samples, C]: one mean per sample and channel
            value = results[output].astype(np.float64).reshape(results[output].shape[0], -1)
            sums[name] = sums.get(name, 0.0) + value.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + np.square(value).sum(axis=0)
        seen += results[next(iter(outputs.values()))].shape[0]
    op_types = {node.name: node.op_type for node, _ in targets}
    shifts = {}
    for name, total in sums.items():
        mean = total / max(seen, 1)
        variance = np.maximum(squares[name] / max(seen, 1) - np.square(mean), 0.0) * seen / max(seen - 1, 1)
        sem = np.sqrt(variance / seen) if seen > 1 else np.full_like(mean, np.inf)
        shifts[name] = LayerShift(name, op_types[name], mean, sem, seen, keys[name])
    return shifts


def correct_biases(float_model: ModelProto, plan: QuantPlan, shifts: Sequence[dict[str, LayerShift]]
                   ) -> tuple[ModelProto, list[BiasShift]]:
    """A copy of `float_model` whose layers quantized in `plan` carry bias − shift on the channels
    `LayerShift.keep_channels` keeps (others unchanged), and one row per measured layer quantized in
    `plan` (`corrected_channels` 0: every channel's shift was noise, the bias is unchanged). `shifts`:
    measurements of layer -> shift; a layer takes the first measured with the weight rounding `plan`
    gives it, and is left alone when none was."""
    keys = weight_keys(float_model, plan)
    corrected = ModelProto()
    corrected.CopyFrom(float_model)
    index = GraphIndex(corrected.graph)
    readers: dict[str, int] = {}
    for node in corrected.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    changes = []
    for node in corrected.graph.node:
        measured_shift = next((measurement[node.name] for measurement in shifts if node.name in keys
                               and node.name in measurement and measurement[node.name].weight == keys[node.name]),
                              None)
        if measured_shift is None:
            continue
        keep = measured_shift.keep_channels()
        shift = np.where(keep, measured_shift.mean, 0.0)
        dropped = np.abs(measured_shift.mean[~keep & np.isfinite(measured_shift.mean)])
        if not keep.any():
            changes.append(BiasShift(node.name, node.op_type, int(shift.size), 0, 0.0, 0.0,
                                     float(dropped.max()) if dropped.size else 0.0, False))
            continue
        beta = float(node_attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias and node.input[2] not in index.initializers:
            continue  # a computed bias: nothing constant to correct
        if has_bias:
            bias = tensor_array(index.initializers[node.input[2]]).astype(np.float64)
            if bias.shape not in ((shift.size,), (1,), ()) or beta == 0.0:
                continue
        else:
            bias = np.zeros(shift.size)
        new_bias = (np.broadcast_to(bias, shift.shape) - shift / beta).astype(np.float32)
        if has_bias and readers.get(node.input[2]) == 1 and bias.shape == shift.shape:  # its own: keep the name
            index.initializers[node.input[2]].CopyFrom(numpy_helper.from_array(new_bias, node.input[2]))
        else:
            name = index.unique_name(f"{node.name}.corrected_bias")
            corrected.graph.initializer.append(numpy_helper.from_array(new_bias, name))
            if len(node.input) > 2:
                node.input[2] = name
            else:
                node.input.append(name)
        changes.append(BiasShift(node.name, node.op_type, int(shift.size), int(keep.sum()),
                                 float(np.abs(shift[keep]).max()), float(np.abs(shift[keep]).mean()),
                                 float(dropped.max()) if dropped.size else 0.0, not has_bias))
    remove_unused_initializers(corrected)
    return corrected, changes


def requantize(float_model: ModelProto, recipe, table, saturating_host: bool, plan: QuantPlan, quantized: ModelProto,
               shifts: Sequence[dict[str, LayerShift]], keep_float: dict[str, str] | None = None
               ) -> tuple[QuantPlan, ModelProto, list[BiasShift]]:
    """Correct the biases of the layers `plan` (the recipe's, placement included, made from
    `float_model`) quantizes, then plan and apply the corrected model again as `qtool quantize` does:
    (plan, quantized model, one row per layer measured). `plan` and `quantized` come back unchanged
    when no channel's shift stood out of its noise. `keep_float`: nodes the recipe's selection kept float
    beyond the recipe (select_tensors' argument)."""
    corrected, changes = correct_biases(float_model, plan, shifts)
    if not any(change.corrected_channels for change in changes):
        return plan, quantized, changes
    placed = plan_and_apply(corrected, recipe, select_tensors(corrected, recipe, keep_float), table, saturating_host)
    return placed.plan, placed.model, changes
