"""A float16/bfloat16 model becomes a float32 working copy whose inputs and outputs keep their type.

ONNX Runtime's integer kernels (QLinearConv, QGemm, ...) fuse only float32 Q/DQ
groups, and a plan over a float16 graph finds "no float inputs to quantize". So
every 16-bit float initializer, constant, cast target and declared type inside
the graph becomes float32; a Cast after each 16-bit graph input and before each
16-bit graph output keeps the model's interface (and the user's data) as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex

HALF_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
# Attributes naming the element type an op produces.
TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                   "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


def widen_to_float32(model: ModelProto) -> str | None:
    """Turn a model computing in float16/bfloat16 into a float32 one with the same interface;
    say what was done (None: nothing was 16-bit float)."""
    graph = model.graph
    kinds = sorted({HALF_TYPES[t] for t in _half_types_in(graph)})
    if not kinds:
        return None
    index = GraphIndex(graph)
    half_inputs = [v for v in graph.input if v.type.tensor_type.elem_type in HALF_TYPES
                   and v.name not in index.initializers]
    half_outputs = [v for v in graph.output if v.type.tensor_type.elem_type in HALF_TYPES
                    and v.name in index.producer]
    kept = {v.name for v in graph.output if v.name in index.initializers}  # returned as they are
    _widen_graph(graph, kept, top=True)
    head, tail = [], []
    for value in half_inputs:
        wide = index.unique_name(f"{value.name}_float32")
        _rename_reads(graph, value.name, wide)
        head.append(helper.make_node("Cast", [value.name], [wide], to=TensorProto.FLOAT,
                                     name=index.unique_name(f"{value.name}_to_float32")))
    for value in half_outputs:
        wide = index.unique_name(f"{value.name}_float32")
        for node in graph.node:
            node.output[:] = [wide if name == value.name else name for name in node.output]
        _rename_reads(graph, value.name, wide)
        elem = value.type.tensor_type.elem_type
        tail.append(helper.make_node("Cast", [wide], [value.name], to=elem,
                                     name=index.unique_name(f"{value.name}_to_{HALF_TYPES[elem]}")))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    interface = ", ".join(v.name for v in half_inputs + half_outputs)
    return (f"{' and '.join(kinds)} model computed in a float32 working copy"
            + (f"; {interface} keep their type through Cast nodes" if interface else ""))


def _half_types_in(graph: onnx.GraphProto) -> set[int]:
    found = {init.data_type for init in graph.initializer}
    found |= {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == TYPE_ATTRIBUTES.get(node.op_type):
                found.add(attribute.i)
            if attribute.type == onnx.AttributeProto.TENSOR:
                found.add(attribute.t.data_type)
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found |= _half_types_in(body)
    return found & set(HALF_TYPES)


def _widen_graph(graph: onnx.GraphProto, kept: set[str], top: bool) -> None:
    """Every 16-bit float inside `graph` (and its subgraphs) to float32; the top graph's
    declared inputs and outputs are left to the Cast nodes."""
    for i, init in enumerate(graph.initializer):
        if init.data_type in HALF_TYPES and init.name not in kept:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(_as_float32(init), init.name))
    values = list(graph.value_info) + ([] if top else list(graph.input) + list(graph.output))
    for value in values:
        if value.type.tensor_type.elem_type in HALF_TYPES:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == TYPE_ATTRIBUTES.get(node.op_type) and attribute.i in HALF_TYPES:
                attribute.i = TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in HALF_TYPES:
                attribute.t.CopyFrom(numpy_helper.from_array(_as_float32(attribute.t), attribute.t.name))
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _widen_graph(body, set(), top=False)


def _as_float32(tensor: onnx.TensorProto) -> np.ndarray:
    return tensor_array(tensor).astype(np.float32)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node (subgraphs included) that reads `old` reads `new`."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_reads(body, old, new)
