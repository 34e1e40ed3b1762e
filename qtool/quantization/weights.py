"""Weight quantization: the scales, zero points and codes of constant weights and of MatMulNBits.

`build_plan` decides which weights are quantized and with which WeightSpec;
this module turns each float weight into integers: ranges, the int32-bias fit,
then the codes (round to nearest, or GPTQ where calibration measured the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np



from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex
from qtool.numerics import (QTYPES, broadcast_param, channel_ranges, gptq_round, mse_block_ranges, quant_bounds,
                            quantize, scale_zero_point)
from qtool.quantization.rules import RULES, OpRule
from qtool.recipe.schema import Recipe, WeightSpec


@dataclass(frozen=True)
class ConstantQuant:
    """A float initializer stored as integers plus one DequantizeLinear."""

    tensor: str
    qtype: str
    axis: int | None
    scale: np.ndarray
    zero_point: np.ndarray
    role: str  # "weight" or "constant" (an initializer operand of Add, Mul, ...)
    block_size: int | None = None  # per_block: scale has the weight's rank, blocked along `axis`
    reduce_range: bool = False
    symmetric: bool = True
    codes: np.ndarray | None = None  # the integers to store (gptq rounding); None: round to nearest


@dataclass(frozen=True)
class BiasQuant:
    tensor: str
    node: str
    activation: str
    weight: str


@dataclass(frozen=True)
class NBitsQuant:
    """A MatMul with a constant [K, N] weight, rewritten as com.microsoft MatMulNBits."""

    node: str
    weight: str
    bits: int
    block_size: int
    k: int
    n: int
    scale: np.ndarray  # [N, blocks] float32
    zero_point: np.ndarray | None  # [N, blocks] uint8 in [0, 2**bits); None: symmetric (2**(bits-1))
    quantized: np.ndarray  # [N, blocks * block_size] uint8 in [0, 2**bits), K padded with zero points


def weights_reduce_range(recipe: Recipe, saturating_host: bool) -> bool:
    setting = recipe.quantization.weights.reduce_range
    return saturating_host if setting == "auto" else bool(setting)


def _gemm_trans_b(node) -> bool:
    return bool(next((a.i for a in node.attribute if a.name == "transB"), 0))


def weight_axes(node, rule: OpRule, weight: np.ndarray) -> tuple[int | None, int]:
    """(output-channel axis, reduction axis) of a weight; Gemm's depend on transB. The channel
    axis is None for a rank the rule gives no per-channel axis (per_tensor then)."""
    if rule.weight_axis == "gemm":
        return (0, 1) if _gemm_trans_b(node) else (1, 0)
    channel = int(rule.weight_axis) % weight.ndim
    if rule.channel_ranks is not None and weight.ndim not in rule.channel_ranks:
        channel = None
    return channel, int(rule.reduction_axis) % weight.ndim


def weight_quant(node, rule: OpRule, name: str, array: np.ndarray, spec: WeightSpec,
                 reduce_range: bool) -> ConstantQuant:
    channel_axis, reduction_axis = weight_axes(node, rule, array)
    block_size = None
    if spec.granularity == "per_block":
        axis, block_size = reduction_axis, spec.block_size
        lo, hi = mse_block_ranges(array, axis, block_size, QTYPES[spec.dtype], spec.symmetric)
    else:
        axis = channel_axis if spec.granularity == "per_channel" else None
        lo, hi = channel_ranges(array, axis)
    scale, zero_point = scale_zero_point(lo, hi, QTYPES[spec.dtype], spec.symmetric, reduce_range)
    return ConstantQuant(name, spec.dtype, axis, scale, zero_point, "weight", block_size, reduce_range,
                         spec.symmetric)


def nbits_quant(node, weight: str, array: np.ndarray, bits: int, block_size: int, symmetric: bool) -> NBitsQuant:
    """Block-wise unsigned `bits`-bit codes of a [K, N] weight, laid out as MatMulNBits wants ([N, K])."""
    k, n = array.shape
    blocks = -(-k // block_size)
    qtype = QTYPES["int4" if symmetric else "uint4"]
    lo, hi = mse_block_ranges(array, 0, block_size, qtype, symmetric)  # [blocks, N]
    scale, zero_point = scale_zero_point(lo, hi, qtype, symmetric)
    codes = quantize(array, scale, zero_point, qtype, axis=0, block_size=block_size).astype(np.int64)
    offset = 2 ** (bits - 1) if symmetric else 0
    zp = np.asarray(zero_point, np.int64) + offset  # [blocks, N], unsigned
    codes = codes + offset
    padded = np.concatenate([codes, np.repeat(zp[-1:], blocks * block_size - k, axis=0)])  # pad = value 0
    return NBitsQuant(
        node.name, weight, bits, block_size, k, n,
        np.ascontiguousarray(scale.T.astype(np.float32)),
        None if symmetric else np.ascontiguousarray(zp.T.astype(np.uint8)),
        np.ascontiguousarray(padded.T.astype(np.uint8)),
    )


def quantize_constants(graph_nodes, decisions, index: GraphIndex, activations: dict, recipe: Recipe,
                       reduce_range: bool, hessians: dict[str, np.ndarray], notes: list[str]):
    """(constants, biases, nbits) for the quantized nodes: weights and initializer operands as
    integers, biases as int32 where the node's input and weight are quantized.

    Scales are final (the bias fit may raise them) before any weight is rounded; weights
    whose first quantized reader has a Hessian (by node name) get GPTQ codes.
    """
    readers: dict[str, object] = {}  # weight -> the node that set its quantization
    constants: dict[str, ConstantQuant] = {}
    biases: dict[tuple[str, str], BiasQuant] = {}
    nbits: dict[str, NBitsQuant] = {}
    weight_only = recipe.quantization.weight_only
    for node, decision in zip(graph_nodes, decisions):
        if not decision.quantized or decision.dynamic:  # dynamic kernels: quantization/dynamic.py
            continue
        if decision.weight_only:
            name = node.input[1]
            array = tensor_array(index.initializers[name])
            if not finite(name, array, notes):
                continue
            if decision.weight_only == "matmulnbits":
                nbits[node.name] = nbits_quant(node, name, array, weight_only.bits, weight_only.block_size,
                                               weight_only.symmetric)
            elif name not in constants:
                spec = WeightSpec(dtype="int4" if weight_only.symmetric else "uint4", symmetric=weight_only.symmetric,
                                  granularity="per_block", block_size=weight_only.block_size)
                constants[name] = weight_quant(node, RULES["MatMul"], name, array, spec, False)
            continue
        rule = RULES[node.op_type]
        act_spec, w_spec = decision.activations, decision.weights
        if decision.weight_input is not None:
            name = node.input[decision.weight_input]
            array = tensor_array(index.initializers[name])
            # The saturating u8 x s8 kernels exist only for 8-bit weights read with 8-bit activations.
            eight_bit = QTYPES[w_spec.dtype].bits == 8 and QTYPES[act_spec.dtype].bits == 8
            if name not in constants and finite(name, array, notes):
                constants[name] = weight_quant(node, rule, name, array, w_spec, reduce_range and eight_bit)
                readers[name] = node
                if w_spec.granularity == "per_channel" and constants[name].axis is None:
                    notes.append(f"{name}: {node.op_type} weight is {array.ndim}-D, quantized per_tensor "
                                 f"(ONNX Runtime's integer kernels take per-channel scales only for "
                                 f"{' or '.join(f'{r}-D' for r in rule.channel_ranks)} weights)")
        for i in decision.activation_inputs:
            name = node.input[i]
            if name in index.initializers and name not in constants:
                array = tensor_array(index.initializers[name])
                if not finite(name, array, notes):
                    continue
                lo, hi = channel_ranges(array, None)
                qtype = QTYPES[act_spec.dtype]
                scale, zero_point = scale_zero_point(lo, hi, qtype, act_spec.symmetric)
                constants[name] = ConstantQuant(name, act_spec.dtype, None, scale, zero_point, "constant",
                                                symmetric=act_spec.symmetric)
        if decision.bias_input is not None and node.input[decision.weight_input] in constants:
            bias = node.input[decision.bias_input]
            weight = node.input[decision.weight_input]
            bias_values = tensor_array(index.initializers[bias])
            if not finite(bias, bias_values, notes):
                continue
            bias_shape = tuple(index.initializers[bias].dims)
            channels = constants[weight].scale.size
            # Every rule's weight axis is its output-channel axis, which the bias follows.
            if node.input[0] in activations and len(bias_shape) == 1 and channels in (1, bias_shape[0]) \
                    and constants[weight].block_size is None:
                constants[weight] = fit_bias_in_int32(constants[weight], bias_values,
                                                       activations[node.input[0]].scale, notes)
                biases[(node.name, bias)] = BiasQuant(bias, node.name, node.input[0], weight)
    for name, node in readers.items():
        if node.name in hessians:
            array = tensor_array(index.initializers[name])
            constants[name] = gptq_weight(node, array, constants[name], hessians[node.name])
    return constants, biases, nbits


# Per-channel scales gptq tries, as multiples of the min/max scale: never smaller, so nothing
# is clipped and the int32 bias still fits. A slightly coarser grid often lands the rounded
# weights nearer the ideal output (measured on digits_cnn: +4 dB A16W8 output SQNR).
SCALE_FACTORS = tuple(np.linspace(1.0, 1.2, 11))


def gptq_weight(node, array: np.ndarray, const: ConstantQuant, hessian: np.ndarray) -> ConstantQuant:
    """`const` with GPTQ codes, and per channel the scale (of SCALE_FACTORS) whose codes
    give the least output error tr(E H Eᵀ). The weight is laid out as [groups, outputs, d]
    to meet H [groups, d, d]; per_tensor and per_block scales are kept as they are."""
    qtype = QTYPES[const.qtype]
    qmin, qmax = quant_bounds(qtype, const.symmetric, const.reduce_range)
    if node.op_type == "Conv":
        groups = hessian.shape[0]
        to_rows = lambda a: a.reshape(groups, a.shape[0] // groups, -1)  # noqa: E731
        back = lambda q: q.reshape(array.shape)  # noqa: E731
    elif node.op_type == "Gemm" and _gemm_trans_b(node):  # [N, K]
        to_rows, back = (lambda a: a[None]), (lambda q: q[0])
    else:  # MatMul, Gemm: [K, N]
        to_rows, back = (lambda a: a.T[None]), (lambda q: q[0].T)
    factors = SCALE_FACTORS if const.axis is not None and not const.block_size else (1.0,)
    # Every candidate scale is a copy of the rows, all rounded in one batched pass: [factors, groups, rows, d].
    scales = [(const.scale.astype(np.float64) * f).astype(np.float32) for f in factors]
    broadcast = lambda p: to_rows(np.broadcast_to(  # noqa: E731
        broadcast_param(p, array.shape, const.axis, const.block_size), array.shape)).astype(np.float64)
    w = to_rows(array.astype(np.float64))
    scale = np.stack([broadcast(s) for s in scales])
    zero_point = broadcast(const.zero_point)
    codes = gptq_round(np.broadcast_to(w, scale.shape), scale, np.broadcast_to(zero_point, scale.shape),
                       qmin, qmax, hessian[None])
    error = (codes - zero_point) * scale - w
    cost = np.sum((error @ hessian) * error, axis=-1).reshape(len(factors), -1)  # tr(E H Eᵀ) per channel
    best = np.argmin(cost, axis=0)  # the first (smallest) factor on ties
    channels = np.arange(cost.shape[1])
    chosen = codes.reshape(len(factors), cost.shape[1], -1)[best, channels].reshape(w.shape)
    return replace(const, codes=back(chosen).astype(qtype.numpy),
                   scale=np.stack(scales)[best, channels] if len(factors) > 1 else const.scale)


def finite(name: str, array: np.ndarray, notes: list[str]) -> bool:
    """Constants holding NaN or inf (masks, broken exports) stay float: no scale can carry them."""
    if np.all(np.isfinite(array)):
        return True
    notes.append(f"{name}: holds NaN or infinite values, kept float")
    return False


def fit_bias_in_int32(weight: ConstantQuant, bias: np.ndarray, input_scale: float, notes: list[str]) -> ConstantQuant:
    """Raise weight scales whose int32 bias (scale = input x weight scale) would saturate.

    A near-dead channel (weights ~1e-26) gets a near-zero scale; its bias divided by
    that overflows int32 and the channel's bias silently becomes -2^31 x scale. Every
    weight mode goes through here: an asymmetric channel whose scale is raised gets the
    zero point that keeps its lowest represented value, so its range stays covered.
    """
    scale = weight.scale.astype(np.float64)
    limit = np.abs(bias.astype(np.float64)) / (input_scale * float(2**31 - 1) * 0.5)
    limit = limit.reshape(scale.shape) if limit.size == scale.size else np.full(scale.shape, limit.max())
    if np.all(scale >= limit):
        return weight
    raised = np.maximum(scale, limit)
    notes.append(f"{weight.tensor}: {int(np.sum(raised > scale))} channel scale(s) raised so the int32 bias fits")
    zero_point = weight.zero_point
    if not weight.symmetric:
        qtype = QTYPES[weight.qtype]
        qmin, qmax = quant_bounds(qtype, False, weight.reduce_range)
        lowest = (qmin - weight.zero_point.astype(np.float64)) * scale  # <= 0: the range's low end
        zero_point = np.clip(np.rint(qmin - lowest / raised), qmin, qmax).astype(qtype.numpy)
    return replace(weight, scale=raised.astype(np.float32), zero_point=zero_point)
