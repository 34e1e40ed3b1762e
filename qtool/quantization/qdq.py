"""Carry out a QuantPlan: the only code that inserts QuantizeLinear/DequantizeLinear.

Weights and constants are stored as integers behind one DequantizeLinear;
each planned activation gets one Q/DQ pair right after its producer. The consumers the
plan quantizes read the dequantized value, and so does every reader of a quantized node's
output; a float node reads a float producer's output as it is.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper, version_converter

from qtool.io.external import SpillFile, tensor_array
from qtool.io.model import PROTOBUF_LIMIT, GraphIndex, opset_version, proto_size, run_checker
from qtool.numerics import QTYPES, quantize
from qtool.quantization.dynamic import DynamicQuant
from qtool.quantization.plan import QuantPlan
from qtool.quantization.prepare import remove_unused_initializers
from qtool.quantization.weights import NBitsQuant

MS_DOMAIN = "com.microsoft"
INT32_SAFE_LIMIT = 2**31 - 256  # |bias / scale| from here on may cast past int32 after float32 rounding


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
    spill_file = SpillFile() if proto_size(model) >= PROTOBUF_LIMIT else None  # weights to disk as made
    head: list[onnx.NodeProto] = []  # DQ of constants and Q/DQ of graph inputs
    dequantized: dict[str, str] = {}  # float tensor -> the name quantized consumers read

    def add_initializer(name: str, array: np.ndarray) -> str:
        unique = index.unique_name(name)
        graph.initializer.append(spill_file.initializer(array, unique) if spill_file else
                                 numpy_helper.from_array(array, unique))
        return unique

    def domain(qtype: str) -> str:
        return plan.qdq_domain_16bit if QTYPES[qtype].bits == 16 else ""

    def dq_node(source: str, scale: str, zero_point: str | None, output: str, axis: int | None,
                block_size: int | None = None, qtype: str = "int32") -> onnx.NodeProto:
        kwargs = {"axis": axis} if axis is not None else {}
        if block_size:
            kwargs["block_size"] = block_size
        inputs = [source, scale] + ([zero_point] if zero_point else [])
        return helper.make_node("DequantizeLinear", inputs, [output], domain=domain(qtype),
                                name=index.unique_name(f"{output}_DequantizeLinear"), **kwargs)

    for name, const in plan.constants.items():
        array = tensor_array(index.initializers[name])
        qtype = QTYPES[const.qtype]
        q = const.codes if const.codes is not None else \
            quantize(array, const.scale, const.zero_point, qtype, const.axis, const.block_size)
        q_name = add_initializer(f"{name}_quantized", q)
        blocked = const.block_size is not None
        scale = add_initializer(f"{name}_scale", _param(const.scale, np.float32, blocked))
        zero_point = add_initializer(f"{name}_zero_point", _param(const.zero_point, qtype.numpy, blocked))
        dequantized[name] = index.unique_name(f"{name}_dequantized")
        head.append(dq_node(q_name, scale, zero_point, dequantized[name], const.axis, const.block_size, const.qtype))

    bias_outputs: dict[tuple[str, str], str] = {}
    for key, bias in plan.biases.items():
        array = tensor_array(index.initializers[bias.tensor]).astype(np.float64)
        scale = (plan.activations[bias.activation].scale * plan.constants[bias.weight].scale.astype(np.float64))
        scale = np.broadcast_to(scale, array.shape) if scale.size == 1 and array.size > 1 else scale
        q = np.rint(array / scale)
        if np.any(np.abs(q) > 2**31 - 1):  # fit_bias_in_int32 raised the weight scales so that it fits
            raise PlanViolation(f"{bias.tensor}: int32 bias would clip at scale {float(np.min(scale)):g}")
        q = q.astype(np.int32)
        axis = 0 if scale.size > 1 else None
        q_name = add_initializer(f"{bias.tensor}_quantized", q)
        scale_name = add_initializer(f"{bias.tensor}_scale", _param(scale.astype(np.float32), np.float32))
        bias_outputs[key] = index.unique_name(f"{bias.tensor}_dequantized")
        head.append(dq_node(q_name, scale_name, None, bias_outputs[key], axis))  # int32 zero point: 0

    position = {out: i for i, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}  # producer position -> its Q/DQ pairs
    renames: list[tuple[str, str]] = []
    shared_params: dict[tuple, tuple[str, str]] = {}  # tensors that share a range share initializers
    quantized_as: dict[str, tuple[str, object]] = {}  # activation -> its QuantizeLinear's output, its quant
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
        quantized_as[name] = (q_out, act)
        pair = [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [q_out], domain=domain(act.qtype),
                             name=index.unique_name(f"{name}_QuantizeLinear")),
            dq_node(q_out, scale, zero_point, dequantized[name], None, qtype=act.qtype),
        ]
        if name in position:
            after.setdefault(position[name], []).extend(pair)
        else:
            head.extend(pair)

    quantized_outputs = {out for node, decision in zip(graph.node, plan.nodes) if decision.quantized
                         for out in node.output}
    float_nodes = {node.name for node, decision in zip(graph.node, plan.nodes) if not decision.quantized}
    float_readers: dict[tuple[str, int], str] = {}  # (activation, channels) -> its per-channel DequantizeLinear
    for at, (node, decision) in enumerate(zip(graph.node, plan.nodes)):
        bias = _bias_int32_cannot_hold(node, decision, plan, index) if decision.quantized else None
        if bias is not None:
            after[at] = [_detach_bias(node, bias, index, add_initializer)] + after.get(at, [])
        # A quantized node reads its activations through Q/DQ. So does every reader of a quantized
        # node's output: ORT fuses a producer into an integer kernel only when Q/DQ is all that
        # reads it. A float node reading a float node's (or a graph input's) output reads the
        # float value: no rounding its kernel does not need. Constants are dequantized only for
        # the nodes that planned it.
        for i, name in enumerate(node.input):
            if name in plan.activations and (decision.quantized or name in quantized_outputs
                                              or name in index.graph_outputs):
                channels = None if i else (_float_weight_channels_behind(node, index, plan, float_nodes)
                                           if decision.quantized else _float_weight_channels(node, index))
                if channels is None:
                    node.input[i] = dequantized[name]
                    continue
                if (name, channels) not in float_readers:  # one per tensor and width, shared by its float readers
                    q_out, act = quantized_as[name]
                    scale = add_initializer(f"{name}_scale_per_channel", np.full(channels, act.scale, np.float32))
                    zero_point = add_initializer(f"{name}_zero_point_per_channel",
                                                 np.full(channels, act.zero_point, QTYPES[act.qtype].numpy))
                    float_readers[name, channels] = index.unique_name(f"{name}_dequantized_for_float")
                    reader = dq_node(q_out, scale, zero_point, float_readers[name, channels], 1, qtype=act.qtype)
                    if name in position:
                        after.setdefault(position[name], []).append(reader)
                    else:
                        head.append(reader)
                node.input[i] = float_readers[name, channels]
        if not decision.quantized:
            continue
        if node.name in plan.nbits:
            _to_matmul_nbits(node, plan.nbits[node.name], add_initializer)
            continue
        if node.name in plan.dynamic:  # its output's Q/DQ pairs, if any, read what the extra nodes write
            after[at] = _to_dynamic_kernel(node, plan.dynamic[node.name], index, add_initializer) + after.get(at, [])
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

    absorbed = {quant.absorbs for quant in plan.dynamic.values() if quant.absorbs}
    ordered = list(head)
    for i, node in enumerate(graph.node):
        if node.name not in absorbed:  # a bias Add its DynamicQuantizeMatMul now computes
            ordered.append(node)
        ordered.extend(after.get(i, []))
    # A tensor whose readers all take the per-channel DequantizeLinear (float Conv/ConvTranspose) leaves its
    # plain one unread; ONNX Runtime still runs it (ppocr_det: 125 µs a run).
    unread = set(dequantized.values()) - {name for node in ordered for name in node.input} - index.graph_outputs
    ordered = [node for node in ordered if node.op_type != "DequantizeLinear" or node.output[0] not in unread]
    del graph.node[:]
    graph.node.extend(ordered)
    graph.ClearField("value_info")  # inferred shapes of the float graph; stale after renames
    if any(node.domain == MS_DOMAIN for node in graph.node) and \
            not any(entry.domain == MS_DOMAIN for entry in quantized.opset_import):
        quantized.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_unused_initializers(quantized)
    check_postconditions(quantized, plan)
    return quantized


def _float_weight_channels(node: onnx.NodeProto, index: GraphIndex) -> int | None:
    """Input channels of a float Conv/ConvTranspose/Gemm with a constant float weight, else None.

    ONNX Runtime (1.20+, WeightBiasQuantization) quantizes such a node's weight itself, per tensor,
    when its input comes from a per-tensor DequantizeLinear and its output goes to a QuantizeLinear:
    a node the plan keeps float would run as an integer kernel with coarser weights than qtool's.
    Reading its input through a per-channel DequantizeLinear (the same scale on every channel) is
    the same value and leaves it float.
    """
    weight = index.initializers.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) < 2:
        return None
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return weight.dims[1] * group
    if node.op_type == "ConvTranspose":
        return weight.dims[0]
    if node.op_type == "Gemm" and not next((a.i for a in node.attribute if a.name == "transA"), 0):
        return weight.dims[1] if next((a.i for a in node.attribute if a.name == "transB"), 0) else weight.dims[0]
    return None


def _float_weight_channels_behind(node: onnx.NodeProto, index: GraphIndex, plan: QuantPlan,
                                  float_nodes: set[str]) -> int | None:
    """Input channels of the float Conv/ConvTranspose/Gemm nodes that read a quantized MaxPool's
    unquantized output, when they are all its readers and of one width, else None.

    ONNX Runtime moves a per-tensor DequantizeLinear down through a MaxPool (QDQ propagation); the
    float node behind it then meets `_float_weight_channels`'s pattern and runs as an integer kernel
    (speech_embedding with conv2d_3/7/11/15 excluded: all four ran as QLinearConv). A per-channel
    DequantizeLinear before the MaxPool (whose channels are the reader's) is not moved.
    """
    if node.op_type != "MaxPool" or len(node.output) != 1 or node.output[0] in plan.activations:
        return None
    widths = {_float_weight_channels(reader, index) if reader.name in float_nodes else None
              for reader in index.consumers.get(node.output[0], [])}
    return widths.pop() if len(widths) == 1 else None


def _bias_int32_cannot_hold(node: onnx.NodeProto, decision, plan: QuantPlan, index: GraphIndex) -> np.ndarray | None:
    """The node's effective float bias when ONNX Runtime's BiasQuantization pass would overflow it, else None.

    With default optimisations ORT rewrites the float bias of a Conv or Gemm whose input
    (per-tensor) and weight (per-tensor or per-channel) come from DequantizeLinear into
    int32 at scale input x weight scale, without a range check. With 16-bit activations
    and weights that scale is ~1e-9, and a bias of 2 casts to -2^31 (ppocr_cls A16W16:
    3.2 dB instead of 37.8 dB).
    """
    if node.op_type not in ("Conv", "Gemm") or decision.bias_input is not None or len(node.input) < 3:
        return None
    bias, weight = node.input[2], node.input[1]
    if (bias not in index.initializers or len(index.initializers[bias].dims) != 1
            or node.input[0] not in plan.activations or weight not in plan.constants
            or plan.constants[weight].block_size is not None):
        return None
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
    values = beta * tensor_array(index.initializers[bias]).astype(np.float32)
    scale = np.float32(plan.activations[node.input[0]].scale) * plan.constants[weight].scale.astype(np.float32)
    return values if np.any(np.abs(values / scale) >= np.float32(INT32_SAFE_LIMIT)) else None


def _detach_bias(node: onnx.NodeProto, values: np.ndarray, index: GraphIndex, add_initializer) -> onnx.NodeProto:
    """Take the bias (`values`, beta applied) out of `node` into a float Add after it, which ORT leaves
    alone; returns the Add."""
    if node.op_type == "Conv":  # [C] -> [C, 1, ...]: one per output channel over the spatial dims
        spatial = len(index.initializers[node.input[1]].dims) - 2
        values = values.reshape((-1,) + (1,) * spatial)
    bias = add_initializer(f"{node.input[2]}_detached", values.astype(np.float32))
    output = node.output[0]
    node.output[0] = index.unique_name(f"{output}_before_bias")
    del node.input[2]
    return helper.make_node("Add", [node.output[0], bias], [output], name=index.unique_name(f"{node.name}_bias_add"))


def _param(values: np.ndarray, dtype, blocked: bool = False) -> np.ndarray:
    """Scalar, 1-D per-axis, or (blocked) the weight's rank, as DequantizeLinear wants."""
    values = np.asarray(values, dtype=dtype)
    if blocked:
        return values
    return values.reshape(()) if values.size == 1 else values.reshape(-1)


def _to_matmul_nbits(node: onnx.NodeProto, quant: NBitsQuant, add_initializer) -> None:
    """Rewrite MatMul(A, W) in place as com.microsoft MatMulNBits(A, B, scales[, zero_points]).

    B is [N, blocks, block_size * bits / 8] uint8, two 4-bit codes a byte, the
    first in the low nibble; zero points are packed the same way per column.
    """
    n, blocks = quant.scale.shape
    codes = quant.quantized.reshape(n, blocks, quant.block_size)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    inputs = [node.input[0], add_initializer(f"{quant.weight}_nbits", packed),
              add_initializer(f"{quant.weight}_nbits_scale", quant.scale.reshape(-1))]
    if quant.zero_point is not None:
        zp = quant.zero_point
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        inputs.append(add_initializer(f"{quant.weight}_nbits_zero_point",
                                      (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)))
    output = list(node.output)
    name = node.name
    node.Clear()
    node.CopyFrom(helper.make_node("MatMulNBits", inputs, output, name=name, domain=MS_DOMAIN,
                                   K=quant.k, N=quant.n, bits=quant.bits, block_size=quant.block_size))


def _to_dynamic_kernel(node: onnx.NodeProto, quant: DynamicQuant, index: GraphIndex,
                       add_initializer) -> list[onnx.NodeProto]:
    """Rewrite a float node in place as its dynamic int8 kernel; returns the nodes to run after it
    (a Gather's axis is 0: quantization/dynamic.py refuses others).

    MatMul/Gemm -> com.microsoft DynamicQuantizeMatMul(A, B int8, b_scale[, bias]); LSTM ->
    com.microsoft DynamicQuantizeLSTM (W, R int8 [dirs, in, 4H] with per-row scales and zero
    points); Gather -> Gather on the int8 table, its rows scaled back by their gathered scales.
    """
    name, output = node.name, list(node.output)
    if quant.op_type == "Gather":
        (codes, scale), ids = quant.weights[0], node.input[1]
        rows, scales, values = (index.unique_name(f"{output[0]}_{part}") for part in ("int8", "scale", "float"))
        node.input[0] = add_initializer(f"{node.input[0]}_int8", codes)
        node.output[0] = rows
        return [helper.make_node("Gather", [add_initializer(f"{name}_row_scale", scale), ids], [scales],
                                 name=index.unique_name(f"{name}_scales"), axis=0),
                helper.make_node("Cast", [rows], [values], name=index.unique_name(f"{name}_cast"),
                                 to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [values, scales], [output[0]], name=index.unique_name(f"{name}_rescale"))]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if quant.op_type == "LSTM":
        inputs = list(node.input[:8]) + [""] * (8 - len(node.input))
        for i in (1, 2):
            codes, scale = quant.weights[i]
            inputs[i] = add_initializer(f"{node.input[i]}_int8", codes)
            inputs.extend([add_initializer(f"{node.input[i]}_scale", scale),
                           add_initializer(f"{node.input[i]}_zero_point", np.zeros(scale.shape, np.int8))])
        kwargs = {key: value for key, value in attributes.items() if key != "layout"}
    else:
        codes, scale = quant.weights[1]
        inputs = [node.input[0], add_initializer(f"{node.input[1]}_int8", codes),
                  add_initializer(f"{node.input[1]}_scale", scale)]
        if quant.bias is not None:
            inputs += ["", add_initializer(f"{name}_bias", quant.bias)]
        if quant.output is not None:
            output = [quant.output]
        kwargs = {}
    node.Clear()
    node.CopyFrom(helper.make_node(quant.kernel, inputs, output, name=name, domain=MS_DOMAIN, **kwargs))
    return []


def ensure_opset(model: ModelProto, need: tuple[int, str] | None) -> tuple[ModelProto, str | None]:
    """Upgrade the model to the opset the recipe's types need; say what was done.

    A failed upgrade is not an error here: `build_plan` then writes 16-bit Q/DQ
    as com.microsoft ops, and refuses 4-bit or blocked ones.
    """
    current = opset_version(model)
    if need is None or current >= need[0]:
        return model, None
    target, reason = need
    try:
        upgraded = version_converter.convert_version(model, target)
        run_checker(upgraded)
    except Exception as exc:  # the converter raises bare RuntimeErrors per op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return model, f"opset {current} kept: upgrade to {target} ({reason}) failed: {first}"
    return upgraded, f"opset upgraded from {current} to {target}: {reason}"


def _rename_producer(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The node that wrote graph output `old` now writes `new`, which Q/DQ turns back into `old`."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def check_postconditions(model: ModelProto, plan: QuantPlan) -> None:
    """One QuantizeLinear per planned activation, one MatMulNBits per planned one, and a
    model onnx.checker accepts."""
    nbits = [node.name for node in model.graph.node if node.op_type == "MatMulNBits"]
    if sorted(nbits) != sorted(plan.nbits):
        raise PlanViolation(f"expected {len(plan.nbits)} MatMulNBits nodes, found {len(nbits)}")
    kernels = {node.name: node.op_type for node in model.graph.node}
    wrong = [name for name, quant in plan.dynamic.items() if kernels.get(name) != quant.kernel]
    if wrong:
        raise PlanViolation(f"{wrong[0]}: planned as {plan.dynamic[wrong[0]].kernel}, not written as one")
    quantized_inputs = [node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"]
    if len(quantized_inputs) != len(plan.activations) or len(set(quantized_inputs)) != len(quantized_inputs):
        raise PlanViolation(
            f"expected one QuantizeLinear per planned activation ({len(plan.activations)}), "
            f"found {len(quantized_inputs)}"
        )
    try:
        run_checker(model)
    except onnx.checker.ValidationError as exc:
        raise PlanViolation(f"quantized model fails onnx.checker: {str(exc).splitlines()[0]}") from None
