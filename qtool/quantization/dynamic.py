"""Dynamic quantization: which float nodes ONNX Runtime's dynamic int8 kernels can take, and their int8 weights.

Weights are stored int8 (symmetric, per output channel where the kernel takes it); the
kernel quantizes its activation input at run time (uint8, the tensor's own min/max, every
run), so no calibration range is needed. `DYNAMIC_KERNELS` is the table: one entry an op
type. `qdq.apply_plan` writes the kernels; this module only decides and rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto, helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex
from qtool.numerics import QTYPES, quant_bounds

# op type -> the ONNX Runtime kernel it becomes (com.microsoft contrib ops but Gather).
DYNAMIC_KERNELS: dict[str, str] = {
    "MatMul": "DynamicQuantizeMatMul",  # A float, B int8 [K, N], per-column scales
    "Gemm": "DynamicQuantizeMatMul",  # transA 0; alpha folded into the scales, beta * C into the bias
    "LSTM": "DynamicQuantizeLSTM",  # W, R int8, per gate row
    "Gather": "Gather",  # int8 table, one scale per row gathered beside it: 4x smaller, no kernel change
}
# An embedding table smaller than this stays float: the bytes saved do not pay for the Cast/Mul it adds.
GATHER_MIN_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class DynamicQuant:
    """One node's dynamic kernel: its int8 weights (by input index) with their float32 scales.

    MatMul/Gemm: {1: (codes [K, N], scale [N] or [])}, `bias` [N] or None. LSTM: {1: W, 2: R}, codes
    [dirs, in, 4H] (ONNX Runtime's layout, transposed from ONNX's), scales [dirs, 4H]. Gather:
    {0: (codes [V, D], scale [V, 1])}.
    """

    node: str
    op_type: str
    kernel: str
    weights: dict[int, tuple[np.ndarray, np.ndarray]]
    bias: np.ndarray | None = None
    per_channel: bool = True
    reduce_range: bool = False
    absorbs: str | None = None  # the bias Add folded into the kernel (its output is now the kernel's)
    output: str | None = None  # that Add's output


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dynamic_refusal(node, index: GraphIndex, types: dict[str, int]) -> str | None:
    """Why `node` cannot run as its dynamic kernel (None: it can). Types are TensorProto enums by name."""
    kernel = DYNAMIC_KERNELS.get(node.op_type)
    if kernel is None:
        return "dynamic: not a MatMul, Gemm, LSTM or Gather (the ops with a dynamic int8 kernel that beats float)"
    is_const = lambda i: len(node.input) > i and node.input[i] in index.initializers  # noqa: E731
    dims = lambda i: list(index.initializers[node.input[i]].dims)  # noqa: E731
    weight = 0 if node.op_type == "Gather" else 1
    if not is_const(weight) or types.get(node.input[weight]) != TensorProto.FLOAT:
        return "dynamic: the weight is not a float32 constant"
    attributes = _attributes(node)
    if node.op_type == "MatMul" and len(dims(1)) != 2:
        return f"dynamic: weight is not 2-D ({len(dims(1))}-D)"
    if node.op_type == "Gemm":
        if attributes.get("transA", 0):
            return "dynamic: Gemm with transA"
        n = dims(1)[0 if attributes.get("transB", 0) else 1]
        if len(node.input) > 2 and node.input[2] and (
                not is_const(2) or int(np.prod(dims(2))) not in (1, n) or len(dims(2)) > 2):
            return "dynamic: Gemm bias is not a constant of N values"
    if node.op_type == "LSTM":
        if not is_const(2) or len(dims(1)) != 3 or len(dims(2)) != 3:
            return "dynamic: W and R are not 3-D constants"
        if attributes.get("layout", 0) != 0:
            return "dynamic: LSTM layout 1 (DynamicQuantizeLSTM takes layout 0)"
    if node.op_type == "Gather":
        if len(dims(0)) != 2 or attributes.get("axis", 0) != 0:
            return "dynamic: Gather is not a row lookup in a 2-D table"
        if int(np.prod(dims(0))) < GATHER_MIN_ELEMENTS:
            return f"dynamic: table of {int(np.prod(dims(0)))} values (< {GATHER_MIN_ELEMENTS}) stays float"
    if node.op_type != "Gather" and types.get(node.input[0]) != TensorProto.FLOAT:
        return "dynamic: input is not float32"
    return None


def _round(w: np.ndarray, axis: int | None, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of `w` and their float32 scales, shaped to broadcast against `w`: one per
    index of `axis` (the peak over every other axis), one in all when axis is None."""
    qmin, qmax = quant_bounds(QTYPES["int8"], True, reduce_range)
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    peak = np.max(np.abs(w), axis=reduce, keepdims=True).astype(np.float64)
    scale = np.where(peak > 0, peak / qmax, 1.0)
    codes = np.clip(np.rint(w / scale), qmin, qmax).astype(np.int8)
    return codes, scale.astype(np.float32)


def dynamic_quant(node, index: GraphIndex, per_channel: bool, reduce_range: bool) -> DynamicQuant:
    """Round the node's weights for its kernel (`dynamic_refusal` said it can run it)."""
    array = lambda i: tensor_array(index.initializers[node.input[i]]).astype(np.float32)  # noqa: E731
    attributes = _attributes(node)
    kernel = DYNAMIC_KERNELS[node.op_type]
    bias = None
    if node.op_type == "Gather":
        codes, scale = _round(array(0), 0, reduce_range=False)
        weights = {0: (codes, scale.reshape(-1, 1))}
    elif node.op_type == "LSTM":
        weights = {}
        for i in (1, 2):  # [dirs, 4H, in]: one scale per direction and gate row, as ONNX Runtime's own
            w = array(i)
            codes, scale = _round(w.reshape(-1, w.shape[2]), 0, reduce_range)
            weights[i] = (np.ascontiguousarray(codes.reshape(w.shape).transpose(0, 2, 1)),
                          scale.reshape(w.shape[:2]))
    else:
        w = array(1)
        if node.op_type == "Gemm":
            w = (w.T if attributes.get("transB", 0) else w) * np.float32(attributes.get("alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                c = array(2).reshape(-1) * np.float32(attributes.get("beta", 1.0))
                bias = np.broadcast_to(c, (w.shape[1],)).astype(np.float32)
        codes, scale = _round(w, 1 if per_channel else None, reduce_range)
        weights = {1: (codes, scale.reshape(-1) if per_channel else scale.reshape(()))}
    return DynamicQuant(node.name, node.op_type, kernel, weights, bias, per_channel, reduce_range)


def absorb_bias_add(quant: DynamicQuant, node, index: GraphIndex, float_nodes: set[str]) -> DynamicQuant:
    """`quant` with the float Add of a constant [N] bias that alone reads a MatMul's output folded in
    (DynamicQuantizeMatMul adds its bias itself: one pass over the output less, ~10 % of albert_ja_pos's
    time). Unchanged for other nodes, shared outputs, graph outputs and Adds `float_nodes` lacks."""
    if quant.kernel != "DynamicQuantizeMatMul" or quant.bias is not None or node.output[0] in index.graph_outputs:
        return quant
    readers = index.consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add" or readers[0].name not in float_nodes:
        return quant
    add = readers[0]
    other = [name for name in add.input if name != node.output[0]]
    n = quant.weights[1][0].shape[1]
    if len(other) != 1 or other[0] not in index.initializers or list(index.initializers[other[0]].dims) != [n]:
        return quant
    bias = tensor_array(index.initializers[other[0]])
    if bias.dtype != np.float32:
        return quant
    return replace(quant, bias=bias, absorbs=add.name, output=add.output[0])


def describe(quant: DynamicQuant) -> str:
    """What the node became, for the report."""
    if quant.op_type == "Gather":
        return "int8 table, one scale per row (dynamic)"
    granularity = "per_channel" if quant.per_channel else "per_tensor"
    return (f"{quant.kernel}: int8 symmetric {granularity} weights"
            + (", 7-bit (reduce_range)" if quant.reduce_range else "") + ", activations quantized at run time")
