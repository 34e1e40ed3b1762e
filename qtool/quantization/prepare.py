"""Function-preserving graph clean-up before quantization.

Constant nodes become initializers (exported Paddle models keep every weight
in one), constant subgraphs are computed, BatchNormalization and constant
bias Adds are folded into the Conv before them, divisions by a constant
become multiplications, shapes are inferred. Each pass returns the number of
things it changed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex, PROTOBUF_LIMIT, opset_version, proto_size
from qtool.quantization.conv_constants import channel_vector, conv_bias
from qtool.quantization.forward_folding import fold_into_next_conv


def initializer_inputs_to_constants(model: ModelProto) -> int:
    """Drop graph inputs that have an initializer: they are defaults, not data.

    IR < 4 requires every initializer to be a graph input, and exporters with
    keep_initializers_as_inputs list them too. Left in, a folded BatchNorm's
    removed initializer turns its input into a required feed; so the IR version
    is raised to 4, where initializers stand on their own.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    kept = [value for value in graph.input if value.name not in initializers]
    dropped = len(graph.input) - len(kept)
    if dropped:
        del graph.input[:]
        graph.input.extend(kept)
    if model.ir_version < 4:
        model.ir_version = 4
    return dropped


def constants_to_initializers(model: ModelProto) -> int:
    """Turn `Constant` nodes holding a tensor into initializers."""
    graph = model.graph
    kept, moved = [], 0
    for node in graph.node:
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = {attr.name: attr for attr in node.attribute}
            value = _constant_value(attribute)
        if value is None:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _constant_value(attribute: dict) -> np.ndarray | None:
    if "value" in attribute:
        return tensor_array(attribute["value"].t)
    if "value_float" in attribute:
        return np.array(attribute["value_float"].f, dtype=np.float32)
    if "value_floats" in attribute:
        return np.array(list(attribute["value_floats"].floats), dtype=np.float32)
    if "value_int" in attribute:
        return np.array(attribute["value_int"].i, dtype=np.int64)
    if "value_ints" in attribute:
        return np.array(list(attribute["value_ints"].ints), dtype=np.int64)
    return None  # sparse or string constants stay as nodes


def fold_batchnorm(model: ModelProto) -> int:
    """Fold inference-mode BatchNormalization into the Conv that feeds only it."""
    graph = model.graph
    index = GraphIndex(graph)
    removed: set[int] = set()
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = _sole_conv_producer(index, bn.input[0])
        params = [index.initializers.get(name) for name in bn.input[1:5]]
        if conv is None or any(p is None for p in params) or len(index.consumers[conv.input[1]]) != 1:
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (tensor_array(p).astype(np.float64) for p in params)
        weight_init = index.initializers[conv.input[1]]
        weight = tensor_array(weight_init).astype(np.float64)
        factor = gamma / np.sqrt(var + epsilon)
        new_weight = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        new_bias = (conv_bias(index, conv) - mean) * factor + beta
        weight_init.CopyFrom(numpy_helper.from_array(new_weight.astype(np.float32), weight_init.name))
        _absorb_into_conv(index, conv, new_bias, bn, "folded_bias")
        removed.add(id(bn))
    _drop_nodes(model, removed)
    return len(removed)


def _sole_conv_producer(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The Conv writing `tensor` when only one node reads it and its weights are constant."""
    conv = index.producer.get(tensor)
    if (conv is None or conv.op_type != "Conv" or len(index.consumers[tensor]) != 1
            or tensor in index.graph_outputs or conv.input[1] not in index.initializers
            or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in index.initializers)):
        return None
    return conv


def _absorb_into_conv(index: GraphIndex, conv: onnx.NodeProto, bias: np.ndarray, follower, label: str) -> None:
    """Give the Conv a new bias and the follower's output, so the follower can be dropped."""
    bias_name = index.unique_name(f"{conv.name or conv.output[0]}.{label}")
    index.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)
    conv.output[0] = follower.output[0]


def _drop_nodes(model: ModelProto, removed: set[int]) -> None:
    if removed:
        kept = [node for node in model.graph.node if id(node) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        remove_unused_initializers(model)


def remove_unused_initializers(model: ModelProto) -> int:
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    used |= {value.name for value in graph.output}
    used |= _subgraph_inputs(graph)
    kept = [init for init in graph.initializer if init.name in used]
    dropped = len(graph.initializer) - len(kept)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return dropped


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that nested graphs (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
            for body in bodies:
                names |= {name for inner in body.node for name in inner.input}
                names |= _subgraph_inputs(body)
    return names


def infer_shapes(model: ModelProto) -> ModelProto:
    """ONNX shape inference, best effort: a model it cannot fully type still works.

    Past protobuf's 2 GB the model cannot be serialized for onnx: inference runs on
    a skeleton whose large initializers keep their type and dims but no data (as
    onnx's path-based inference sees external data), and the types found are
    copied back, so a large model is planned exactly like its small twin.
    """
    large = proto_size(model) > PROTOBUF_LIMIT
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model) if large else model, data_prop=True)
    except Exception:  # inference is an aid; ONNX Runtime gives the real verdict
        return model
    if not large:
        return inferred
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


SKELETON_BYTES = 1 << 20  # initializers from here on stand in by type and dims alone


def _skeleton(model: ModelProto) -> ModelProto:
    """A copy of the model whose large initializers hold no data (marked external instead)."""
    skeleton = ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if tensor.ByteSize() < SKELETON_BYTES:
            skeleton.graph.initializer.append(tensor)
            continue
        stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="skeleton.data")
    return skeleton


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a protobuf message but `skip`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def name_nodes(model: ModelProto) -> int:
    """Give unnamed nodes a unique name: plans and reports refer to nodes by name."""
    index = GraphIndex(model.graph)
    named = 0
    for node in model.graph.node:
        if not node.name:
            node.name = index.unique_name(f"{node.op_type}_{named}")
            named += 1
    return named


# Ops evaluated ahead of time when every input is a constant (exporters leave
# Reshape(bias, shape) and friends in the graph). Small, pure and shape-only or
# elementwise, so folding them cannot blow up the file.
FOLDABLE_OP_TYPES = {
    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Identity",
    "Concat", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal",
}
FOLD_LIMIT_BYTES = 64 << 20


def fold_constants(model: ModelProto) -> int:
    """Replace nodes whose inputs are all initializers by their computed outputs."""
    graph = model.graph
    index = GraphIndex(graph)
    constants = {name: tensor_array(init) for name, init in index.initializers.items()}
    kept, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (node.op_type not in FOLDABLE_OP_TYPES or node.domain not in ("", "ai.onnx") or not inputs
                or not all(name in constants for name in inputs) or len(node.output) != 1
                or node.output[0] in index.graph_outputs):
            kept.append(node)
            continue
        value = _evaluate(node, constants, opset_version(model))
        if value is None or value.nbytes > FOLD_LIMIT_BYTES:
            kept.append(node)
            continue
        constants[node.output[0]] = value
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        remove_unused_initializers(model)
    return folded


def _evaluate(node: onnx.NodeProto, constants: dict, opset: int) -> np.ndarray | None:
    """Run one node with onnx's reference evaluator; None when it cannot."""
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
        (value,) = evaluator.run(None, {name: constants[name] for name in node.input if name})
    except Exception:  # an op or attribute the evaluator does not know: leave it to ORT
        return None
    return np.asarray(value)


def fold_conv_add(model: ModelProto) -> int:
    """Fold `Add(Conv(x), c)` with a per-channel constant `c` into the Conv's bias."""
    graph = model.graph
    index = GraphIndex(graph)
    removed: set[int] = set()
    for add in graph.node:
        found = _conv_and_channel_constant(index, add, "Add")
        if found is None:
            continue
        conv, addend = found
        _absorb_into_conv(index, conv, conv_bias(index, conv) + addend, add, "add_bias")
        removed.add(id(add))
    _drop_nodes(model, removed)
    return len(removed)


def fold_conv_mul(model: ModelProto) -> int:
    """Fold `Mul(Conv(x), c)` with a per-channel constant `c` into the Conv's weights and bias.

    PP-HGNet-style "learnable affine" blocks put a constant Mul and Add after
    every Conv; left alone, each is one more 8-bit rounding of the same wide
    tensor (on ppocr_det each one alone costs the output ~10 dB of SQNR).
    """
    graph = model.graph
    index = GraphIndex(graph)
    removed: set[int] = set()
    for mul in graph.node:
        found = _conv_and_channel_constant(index, mul, "Mul")
        if found is None:
            continue
        conv, factor = found
        weight = tensor_array(index.initializers[conv.input[1]])
        if weight.dtype != np.float32 or not np.all(np.isfinite(factor)):
            continue
        scaled = (weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
        weight_name = index.unique_name(f"{conv.name or conv.output[0]}.scaled_weight")
        graph.initializer.append(numpy_helper.from_array(scaled, weight_name))
        conv.input[1] = weight_name
        _absorb_into_conv(index, conv, conv_bias(index, conv) * factor, mul, "scaled_bias")
        removed.add(id(mul))
    _drop_nodes(model, removed)
    return len(removed)


def _conv_and_channel_constant(index: GraphIndex, node: onnx.NodeProto, op_type: str):
    """(conv, [C] vector) when `node` is `op_type(Conv(x), c)` with c constant per output channel, else None."""
    if node.op_type != op_type or len(node.input) != 2:
        return None
    conv_out, constant = (node.input if node.input[1] in index.initializers else node.input[::-1])
    conv = _sole_conv_producer(index, conv_out)
    if constant not in index.initializers or conv is None:
        return None
    weight_dims = index.initializers[conv.input[1]].dims
    vector = channel_vector(tensor_array(index.initializers[constant]), weight_dims[0], len(weight_dims))
    return None if vector is None else (conv, vector)


def div_by_constant_to_mul(model: ModelProto) -> int:
    """Rewrite `Div(x, c)` with a constant float `c` as `Mul(x, 1/c)`.

    ONNX Runtime has an integer Mul (QLinearMul) but no integer Div, so a float
    Div in a hard-swish (x * relu6(x + 3) / 6) breaks every integer chain it sits
    in with a DequantizeLinear/QuantizeLinear pair. The result differs from the
    Div by at most float rounding. A Div read only by Erf is left alone: it is
    GELU's x / sqrt(2), which ONNX Runtime fuses into one Gelu kernel only as a Div
    (and Erf has no integer kernel either way).
    """
    graph = model.graph
    index = GraphIndex(graph)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or node.input[1] not in index.initializers:
            continue
        readers = index.consumers.get(node.output[0], [])
        if readers and all(reader.op_type == "Erf" for reader in readers):
            continue
        divisor = tensor_array(index.initializers[node.input[1]])
        if divisor.dtype != np.float32 or not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
            continue
        reciprocal = index.unique_name(f"{node.input[1]}.reciprocal")
        graph.initializer.append(numpy_helper.from_array((1.0 / divisor).astype(np.float32), reciprocal))
        node.op_type = "Mul"
        node.input[1] = reciprocal
        rewritten += 1
    if rewritten:
        remove_unused_initializers(model)
    return rewritten


def prepare_model(model: ModelProto) -> tuple[ModelProto, list[str]]:
    """Run every preparation pass; returns the model and what was done."""
    notes = []
    defaults = initializer_inputs_to_constants(model)
    if defaults:
        notes.append(f"{defaults} graph inputs with an initializer treated as constants (defaults, not data)")
    named = name_nodes(model)
    if named:
        notes.append(f"{named} unnamed nodes given names")
    moved = constants_to_initializers(model)
    if moved:
        notes.append(f"{moved} Constant nodes turned into initializers")
    constant_nodes = fold_constants(model)
    if constant_nodes:
        notes.append(f"{constant_nodes} nodes with constant inputs computed ahead of time")
    folded = fold_batchnorm(model)
    if folded:
        notes.append(f"{folded} BatchNormalization nodes folded into Conv")
    scalings = fold_conv_mul(model)
    if scalings:
        notes.append(f"{scalings} constant Muls after a Conv folded into its weights")
    bias_adds = fold_conv_add(model)
    if bias_adds:
        notes.append(f"{bias_adds} constant Adds after a Conv folded into its bias")
    divisions = div_by_constant_to_mul(model)
    if divisions:
        notes.append(f"{divisions} divisions by a constant rewritten as multiplications (integer kernels exist)")
    forward = fold_into_next_conv(model)
    if forward:
        remove_unused_initializers(model)
        notes.append(f"{forward} constant Muls/Adds before a Conv folded into its weights and bias")
    model = infer_shapes(model)
    return model, notes
