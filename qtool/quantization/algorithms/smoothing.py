"""Activation→weight smoothing: move per-channel activation outliers into the next MatMul/Gemm weights.

Xiao et al. 2023, "SmoothQuant": for x read only by linear layers with constant weights W [K, N],
x' = x / s and W' = diag(s) W leave x W unchanged; s_j = max|x_j|^α / max|W_j,:|^(1-α) levels
the channels of x (measured on the calibration data) against their weight rows. The division is
folded into the LayerNormalization that writes x (its scale and bias divided by s), so the graph
keeps its shape. LayerNorms that share their scale/bias, or weights shared between readers, are
smoothed together with one s; a group with any other reader is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.data import DataFolder
from qtool.io.model import GraphIndex, opset_version
from qtool.quantization.algorithms.streaming import measured
from qtool.runtime.session import make_session

ALPHA = 0.5  # SmoothQuant's default migration strength
SCALE_LIMIT = 1e4


@dataclass(frozen=True)
class SmoothedGroup:
    norms: tuple[str, ...]  # LayerNormalization nodes whose scale and bias were divided by s
    readers: tuple[str, ...]  # MatMul/Gemm nodes whose weight rows were multiplied by s
    channels: int
    scale_min: float
    scale_max: float
    outlier_ratio_before: float  # max / median of the channels' max |x|
    outlier_ratio_after: float


def _weight_rows(node, index: GraphIndex) -> tuple[str, int] | None:
    """(weight initializer, the axis indexed by x's channels) of a MatMul/Gemm reading x as input 0."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in index.initializers:
        return None
    if len(index.initializers[node.input[1]].dims) != 2:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and attributes.get("transA", 0):
        return None
    return node.input[1], 1 if node.op_type == "Gemm" and attributes.get("transB", 0) else 0


def find_groups(model: ModelProto) -> list[tuple[list, list]]:
    """(LayerNorms, their readers) for every group that can be smoothed, in graph order."""
    index = GraphIndex(model.graph)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization" and len(n.input) >= 2
             and all(name in index.initializers for name in n.input[1:3] if name)
             and next((a.i for a in n.attribute if a.name == "axis"), -1) == -1]
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    def join(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    usable: dict[str, bool] = {}
    for norm in norms:
        key = f"node:{norm.name}"
        for name in norm.input[1:3]:
            if name:
                join(key, f"tensor:{name}")
        readers = index.consumers.get(norm.output[0], [])
        ok = bool(readers) and norm.output[0] not in index.graph_outputs
        for reader in readers:
            rows = _weight_rows(reader, index) if reader.input[0] == norm.output[0] else None
            ok = ok and rows is not None
            if rows is not None:
                join(key, f"tensor:{rows[0]}")
                join(key, f"node:{reader.name}")
        usable[key] = ok
    members: dict[str, list] = {}
    for norm in norms:
        members.setdefault(find(f"node:{norm.name}"), []).append(norm)
    groups = []
    for root, group in members.items():
        readers = [r for norm in group for r in index.consumers[norm.output[0]]]
        weights = {r.input[1] for r in readers}
        params = {name for norm in group for name in norm.input[1:3] if name}
        # Every reader of every shared initializer must be inside the group.
        inside = {id(n) for n in group} | {id(r) for r in readers}
        closed = all(id(c) in inside for name in weights | params for c in index.consumers[name])
        if closed and all(usable[f"node:{norm.name}"] for norm in group):
            groups.append((group, readers))
    return groups


def _channel_maxima(model: ModelProto, tensors: dict[str, int], data: DataFolder,
                    batch_size: int) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor (name -> its channel count) over the data:
    one float pass whose extra outputs are [K] vectors."""
    measuring = ModelProto()
    measuring.CopyFrom(model)
    graph = measuring.graph
    index = GraphIndex(graph)
    new_axes = opset_version(measuring) >= 18  # ReduceMax's axes became an input
    outputs = {}
    for tensor, channels in tensors.items():
        shape = index.unique_name(f"{tensor}.smoothing.shape")
        rows = index.unique_name(f"{tensor}.smoothing.rows")
        absolute = index.unique_name(f"{tensor}.smoothing.abs")
        peak = index.unique_name(f"{tensor}.smoothing.max")
        graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), shape))
        graph.node.extend([
            helper.make_node("Reshape", [tensor, shape], [rows], name=index.unique_name(f"{rows}_Reshape")),
            helper.make_node("Abs", [rows], [absolute], name=index.unique_name(f"{absolute}_Abs")),
        ])
        if new_axes:
            axes = index.unique_name(f"{peak}.axes")
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
            graph.node.append(helper.make_node("ReduceMax", [absolute, axes], [peak], keepdims=0,
                                               name=index.unique_name(f"{peak}_ReduceMax")))
        else:
            graph.node.append(helper.make_node("ReduceMax", [absolute], [peak], axes=[0], keepdims=0,
                                               name=index.unique_name(f"{peak}_ReduceMax")))
        graph.output.append(helper.make_empty_tensor_value_info(peak))
        outputs[tensor] = peak
    session = make_session(measuring, optimize=False)
    maxima: dict[str, np.ndarray] = {}
    for _, results in measured(session, model, data, batch_size):
        for tensor, peak in outputs.items():
            value = results[peak].astype(np.float64)
            maxima[tensor] = np.maximum(maxima[tensor], value) if tensor in maxima else value
    return maxima


def _ratio(maxima: np.ndarray) -> float:
    median = float(np.median(maxima))
    return float(maxima.max() / median) if median > 0 else 0.0


def smooth(model: ModelProto, data: DataFolder, batch_size: int, alpha: float = ALPHA
           ) -> tuple[ModelProto, list[SmoothedGroup]]:
    """Smooth every group `find_groups` finds, in place; returns the model and what changed."""
    groups = find_groups(model)
    if not groups:
        return model, []
    index = GraphIndex(model.graph)
    channels = {norm.output[0]: int(np.prod(index.initializers[norm.input[1]].dims))
                for group, _ in groups for norm in group}
    maxima = _channel_maxima(model, channels, data, batch_size)
    changes = []
    for norms, readers in groups:
        x_max = np.max([maxima[norm.output[0]] for norm in norms], axis=0)
        rows = {r.input[1]: _weight_rows(r, index)[1] for r in readers}
        weights = {name: tensor_array(index.initializers[name]).astype(np.float64) for name in rows}
        w_max = np.max([np.abs(w).max(axis=1 - rows[name]) for name, w in weights.items()], axis=0)
        scale = np.ones_like(x_max)
        usable = (x_max > 0) & (w_max > 0)
        scale[usable] = x_max[usable] ** alpha / w_max[usable] ** (1 - alpha)
        scale = np.clip(scale, 1 / SCALE_LIMIT, SCALE_LIMIT)
        for name, w in weights.items():
            shape = (-1, 1) if rows[name] == 0 else (1, -1)
            _write(index, name, w * scale.reshape(shape))
        for param in {name for norm in norms for name in norm.input[1:3] if name}:
            _write(index, param, tensor_array(index.initializers[param]).astype(np.float64) / scale)
        changes.append(SmoothedGroup(tuple(n.name for n in norms), tuple(r.name for r in readers), int(scale.size),
                                     float(scale.min()), float(scale.max()), _ratio(x_max), _ratio(x_max / scale)))
    return model, changes


def _write(index: GraphIndex, name: str, value: np.ndarray) -> None:
    index.initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
