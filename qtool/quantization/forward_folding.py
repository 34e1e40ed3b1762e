"""Fold constant Muls and Adds into the Convs that read them (forward folding).

MobileNetV3/PP-LCNet blocks end in `hardswish(x) = x * clip(x + 3, 0, 6) / 6`, and PP-LCNetV3
("learnable affine blocks", PP-OCRv4) follows it with `* a + b`: three constant elementwise ops
between two Convs. Quantized, each is one more 8-bit rounding of the same wide tensor (on ppocr_det
the error doubles over the first blocks). The Conv that reads them absorbs them exactly:
`Conv(x * s) = Conv_{W·s}(x)` always, and `Conv(x + b) = Conv(x) + Σ W·b` when the Conv pads
nothing (a padded border would see 0, not b). Where an Add cannot fold, `v * k + b` is rewritten
`(v + b/k) * k` so the Mul still can. The backward direction (a constant after a Conv) is
qtool.quantization.prepare.fold_conv_mul/fold_conv_add; ONNX Runtime's graph optimizer folds
neither across the activation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex
from qtool.quantization.conv_constants import channel_vector, conv_bias


def fold_into_next_conv(model: ModelProto) -> int:
    """Merge, fold and move until nothing changes; returns how many elementwise nodes were removed."""
    removed = 0
    while True:
        merged, muls, adds = merge_constant_muls(model), fold_mul_into_conv(model), fold_add_into_conv(model)
        if not (merged or muls or adds or move_add_before_mul(model)):
            return removed
        removed += merged + muls + adds


def _constant_operand(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, np.ndarray] | None:
    """(the slot of the constant, its value) for a two-input node with one finite float32 initializer."""
    if len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
        return None
    for slot in (1, 0):
        const, other = node.input[slot], node.input[1 - slot]
        if const in index.initializers and other not in index.initializers:
            value = tensor_array(index.initializers[const])
            if value.dtype == np.float32 and np.all(np.isfinite(value)):
                return slot, value
    return None


def _source(node: onnx.NodeProto, slot: int) -> str:
    """The activation input of a node whose constant sits in `slot`."""
    return node.input[1 - slot]


def _only_read_by(index: GraphIndex, tensor: str, op_type: str) -> list[onnx.NodeProto]:
    """The readers of `tensor` when every one is `op_type` reading it once (a Conv: as its data
    input 0); else []."""
    readers = index.consumers.get(tensor, [])
    if not readers or tensor in index.graph_outputs:
        return []
    if all(r.op_type == op_type and list(r.input).count(tensor) == 1
           and (op_type != "Conv" or r.input[0] == tensor) for r in readers):
        return readers
    return []


def _foldable_convs(index: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """The Convs reading `tensor` when they are its only readers and their weights and bias are constant."""
    convs = _only_read_by(index, tensor, "Conv")
    for conv in convs:
        bias = conv.input[2] if len(conv.input) > 2 else ""
        if conv.input[1] not in index.initializers or (bias and bias not in index.initializers):
            return []
        if tensor_array(index.initializers[conv.input[1]]).dtype != np.float32:
            return []
    return convs


def _per_weight(vector: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """`vector` [C] laid out as W's [M, C/group, 1...]: the input channel each weight reads."""
    out_channels, in_per_group = weight.shape[:2]
    group_of = np.arange(out_channels) // (out_channels // group)
    channel = group_of[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    return vector[channel].reshape(weight.shape[:2] + (1,) * (weight.ndim - 2))


def _group(conv: onnx.NodeProto) -> int:
    return next((a.i for a in conv.attribute if a.name == "group"), 1)


def _pads_nothing(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: a for a in conv.attribute}
    auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    pads = list(attrs["pads"].ints) if "pads" in attrs else []
    return auto_pad in ("NOTSET", "VALID") and not any(pads)


def _set_initializer(index: GraphIndex, node: onnx.NodeProto, slot: int, value: np.ndarray, label: str) -> None:
    name = index.unique_name(f"{node.name or node.output[0]}.{label}")
    index.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    index.initializers[name] = index.graph.initializer[-1]
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = name


def _bypass(model: ModelProto, node: onnx.NodeProto, source: str, readers: list[onnx.NodeProto]) -> None:
    """Point the readers of `node`'s output at `source` and drop `node`."""
    for reader in readers:
        reader.input[0] = source
    model.graph.node.remove(node)


def _vectors(index: GraphIndex, convs: list[onnx.NodeProto], constant: np.ndarray):
    """Each Conv's weights and the constant per its input channel; vectors None if any does not fit."""
    weights = [tensor_array(index.initializers[c.input[1]]) for c in convs]
    vectors = [channel_vector(constant, w.shape[1] * _group(c), w.ndim) for c, w in zip(convs, weights)]
    return weights, None if any(v is None for v in vectors) else vectors


def _fold_first(model: ModelProto, op_type: str, rewrite) -> int:
    """The first `op_type` node with a constant per input channel whose only readers are Convs that
    `rewrite(index, conv, weight [float64], vector [C] float64)` absorbs it into: rewritten, the node
    dropped, 1 returned (the index is stale after a removal: the caller loops); 0 when none is left.
    An Add folds only where every reader pads nothing (a padded border would see 0, not b)."""
    index = GraphIndex(model.graph)
    for node in list(model.graph.node):
        found = _constant_operand(index, node) if node.op_type == op_type else None
        convs = _foldable_convs(index, node.output[0]) if found else []
        if not convs or (op_type == "Add" and not all(_pads_nothing(c) for c in convs)):
            continue
        slot, constant = found
        weights, vectors = _vectors(index, convs, constant)
        if vectors is None:
            continue
        for conv, weight, vector in zip(convs, weights, vectors):
            rewrite(index, conv, weight.astype(np.float64), _per_weight(vector, weight, _group(conv)))
        _bypass(model, node, _source(node, slot), convs)
        return 1
    return 0


def _scale_weights(index: GraphIndex, conv: onnx.NodeProto, weight: np.ndarray, factor: np.ndarray) -> None:
    _set_initializer(index, conv, 1, weight * factor, "input_scaled_weight")


def _shift_bias(index: GraphIndex, conv: onnx.NodeProto, weight: np.ndarray, addend: np.ndarray) -> None:
    shift = (weight * addend).reshape(weight.shape[0], -1).sum(axis=1)
    _set_initializer(index, conv, 2, conv_bias(index, conv) + shift, "input_shifted_bias")


def fold_mul_into_conv(model: ModelProto) -> int:
    """`Conv(x * s)` → `Conv_{W·s}(x)` for s constant per input channel (or scalar): exact."""
    return _fold_first(model, "Mul", _scale_weights)


def fold_add_into_conv(model: ModelProto) -> int:
    """`Conv(x + b)` → `Conv(x)` with bias + Σ W·b, for b constant per input channel and Convs that
    pad nothing: exact."""
    return _fold_first(model, "Add", _shift_bias)


def merge_constant_muls(model: ModelProto) -> int:
    """`(x * c1) * c2` → `x * (c1·c2)` when the inner product has no other reader and the constants
    are scalars or of one shape: one rounding fewer even where no Conv follows."""
    index = GraphIndex(model.graph)
    for outer in list(model.graph.node):
        found = _constant_operand(index, outer) if outer.op_type == "Mul" else None
        inner = index.producer.get(_source(outer, found[0])) if found else None
        inner_found = _constant_operand(index, inner) if inner is not None and inner.op_type == "Mul" else None
        if not inner_found or _only_read_by(index, inner.output[0], "Mul") != [outer]:
            continue
        c1, c2 = inner_found[1], found[1]
        if not (c1.size == 1 or c2.size == 1 or c1.shape == c2.shape):
            continue
        product = c1.astype(np.float64) * c2.astype(np.float64)  # broadcasts to the larger shape
        _set_initializer(index, outer, found[0], product, "merged_scale")
        outer.input[1 - found[0]] = _source(inner, inner_found[0])
        model.graph.node.remove(inner)
        return 1
    return 0


def move_add_before_mul(model: ModelProto) -> int:
    """`(v * k) + b` read only by Convs that pad → `(v + b/k) * k`, so the Mul can fold into them
    (k constant, nonzero, per input channel). Returns 1 when it moved a pair (the next pass folds)."""
    index = GraphIndex(model.graph)
    for add in list(model.graph.node):
        found = _constant_operand(index, add) if add.op_type == "Add" else None
        convs = _foldable_convs(index, add.output[0]) if found else []
        if not convs or all(_pads_nothing(c) for c in convs):
            continue
        mul = index.producer.get(_source(add, found[0]))
        mul_found = _constant_operand(index, mul) if mul is not None and mul.op_type == "Mul" else None
        if not mul_found or _only_read_by(index, mul.output[0], "Add") != [add]:
            continue
        k, b = mul_found[1], found[1]
        if np.any(k == 0) or not (k.size == 1 or b.size == 1 or k.shape == b.shape) \
                or _vectors(index, convs, k)[1] is None:
            continue
        # v -> Mul(k) -> t -> Add(b) -> out   becomes   v -> Add(b/k) -> t -> Mul(k) -> out
        v, t, out = _source(mul, mul_found[0]), mul.output[0], add.output[0]
        _set_initializer(index, add, found[0], b.astype(np.float64) / k.astype(np.float64), "divided_shift")
        add.input[1 - found[0]], add.output[0] = v, t
        mul.input[1 - mul_found[0]], mul.output[0] = t, out
        nodes = list(model.graph.node)
        nodes.remove(add)
        nodes.insert(nodes.index(mul), add)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return 1
    return 0
