"""Cross-layer equalization: rescale consecutive Conv pairs so their per-channel weight ranges match.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", §4.1:
for Conv A -> (Relu | nothing) -> Conv B, output channel i of A is divided by s_i and input
channel i of B multiplied by it, s_i = sqrt(r_A,i / r_B,i) (r: the channel's max |w|), which leaves
both ranges at sqrt(r_A,i r_B,i). Relu(x / s) = Relu(x) / s for s > 0, so the float function is
unchanged. Pairs sharing a Conv are swept until the scales settle, in float64, written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex

SWEEPS = 20  # full passes over the pairs at most; each converges toward the joint optimum
SETTLED = 1e-4  # a sweep whose every |log s| is below this changes nothing that matters
SCALE_LIMIT = 1e3  # no channel is scaled by more than this (nor less than its inverse)


@dataclass(frozen=True)
class EqualizedPair:
    first: str  # node names
    second: str
    through: str  # "Relu" or "" (the tensor goes straight from one Conv to the other)
    channels: int
    scale_min: float  # of the product of every sweep's s_i
    scale_max: float
    spread_before: float  # max / median of the first Conv's channel ranges
    spread_after: float


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1) or 1


def _sole_reader(index: GraphIndex, tensor: str):
    readers = index.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in index.graph_outputs:
        return None
    return readers[0]


def _own_initializer(index: GraphIndex, node, position: int) -> bool:
    """The node's input `position` is a float initializer read by this node alone."""
    if len(node.input) <= position or not node.input[position]:
        return position == 2  # a missing bias is fine
    name = node.input[position]
    return name in index.initializers and len(index.consumers[name]) == 1 \
        and index.initializers[name].data_type == 1 and name not in index.graph_outputs


def find_pairs(model: ModelProto) -> list[tuple[object, object, str]]:
    """(Conv A, Conv B, what lies between) for every pair CLE may rescale, in graph order."""
    index = GraphIndex(model.graph)
    pairs = []
    for first in model.graph.node:
        if first.op_type != "Conv" or not all(_own_initializer(index, first, i) for i in (1, 2)):
            continue
        tensor = first.output[0]
        through, reader = "", _sole_reader(index, tensor)
        if reader is not None and reader.op_type == "Relu":
            through, tensor = "Relu", reader.output[0]
            reader = _sole_reader(index, tensor)
        if reader is None or reader.op_type != "Conv" or reader.input[0] != tensor \
                or not _own_initializer(index, reader, 1):
            continue
        channels = index.initializers[first.input[1]].dims[0]
        second_weight = index.initializers[reader.input[1]]
        if second_weight.dims[1] * _group(reader) != channels:
            continue
        pairs.append((first, reader, through))
    return pairs


def _input_view(weight: np.ndarray, groups: int) -> np.ndarray:
    """B's weight as [input channel, everything it multiplies] (a copy)."""
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, out // groups, per_group, -1)  # [g, out/g, in/g, k]
    return grouped.transpose(0, 2, 1, 3).reshape(groups * per_group, -1)


def _scale_inputs(weight: np.ndarray, groups: int, scale: np.ndarray) -> np.ndarray:
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, out // groups, per_group, -1)
    grouped = grouped * scale.reshape(groups, 1, per_group, 1)
    return grouped.reshape(weight.shape)


def _ranges(array: np.ndarray) -> np.ndarray:
    return np.abs(array.reshape(array.shape[0], -1)).max(axis=1)


def _spread(ranges: np.ndarray) -> float:
    median = float(np.median(ranges))
    return float(ranges.max() / median) if median > 0 else 0.0


def equalize(model: ModelProto) -> tuple[ModelProto, list[EqualizedPair]]:
    """Rescale every pair `find_pairs` finds, in place; returns the model and what changed."""
    pairs = find_pairs(model)
    if not pairs:
        return model, []
    index = GraphIndex(model.graph)
    weights: dict[str, np.ndarray] = {}  # initializer -> float64 value, written back at the end

    def value(name: str) -> np.ndarray:
        if name not in weights:
            weights[name] = tensor_array(index.initializers[name]).astype(np.float64)
        return weights[name]

    totals = [np.ones(index.initializers[a.input[1]].dims[0]) for a, _, _ in pairs]
    before = [_spread(_ranges(value(a.input[1]))) for a, _, _ in pairs]
    for _ in range(SWEEPS):
        largest = 0.0
        for k, (first, second, _) in enumerate(pairs):
            w1, w2 = value(first.input[1]), value(second.input[1])
            groups = _group(second)
            r1, r2 = _ranges(w1), np.abs(_input_view(w2, groups)).max(axis=1)
            usable = (r1 > 0) & (r2 > 0)
            scale = np.ones_like(r1)
            scale[usable] = np.sqrt(r1[usable] / r2[usable])
            scale = np.clip(scale, 1 / SCALE_LIMIT / totals[k], SCALE_LIMIT / totals[k])
            weights[first.input[1]] = w1 / scale.reshape(-1, *([1] * (w1.ndim - 1)))
            if len(first.input) > 2 and first.input[2]:
                weights[first.input[2]] = value(first.input[2]) / scale
            weights[second.input[1]] = _scale_inputs(w2, groups, scale)
            totals[k] = totals[k] * scale
            largest = max(largest, float(np.max(np.abs(np.log(scale)))))
        if largest < SETTLED:
            break
    for name, array in weights.items():
        index.initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return model, [
        EqualizedPair(first.name, second.name, through, int(total.size), float(total.min()), float(total.max()),
                      spread, _spread(_ranges(weights[first.input[1]])))
        for (first, second, through), total, spread in zip(pairs, totals, before)
    ]
