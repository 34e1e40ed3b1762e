"""`quantization.algorithms.outliers`: find the activation tensors whose 8-bit range a few channels or
values dominate, and handle each: equalize it into the layers that read it, or keep it float.

A streaming float pass over the calibration data (outlier_stats) measures each planned 8-bit activation
tensor calibrated with minmax (other methods clip the range: `calibration.method: auto` picks the clip
per tensor, the better answer to a few huge values): min, max and, per channel (the readers' input-channel axis: last for MatMul/Gemm, 1 for Conv;
the whole tensor as one channel for other readers), max |x| and the mean of x^2. From them, the SQNR its
readers' outputs keep from this tensor's rounding alone (uniform noise Δ^2/12 per element, Δ the minmax
step of the planned type, channels uncorrelated):

    SQNR = 12 Σ_j E[x_j^2] ‖W_j‖^2 / (Δ^2 Σ_j ‖W_j‖^2)

W_j: the readers' weights that multiply channel j (without weights, one channel of weight 1: the tensor's
own SQNR). Two readers change the signal side: an Add/Sub/Mul combining the tensor with another
activation passes its error on while its own values can be far smaller (E[x^2] - E[x]^2; (x - mean) *
1/std), so E[x^2] is capped by E[out^2] (over E[other^2] for Mul); a root, reciprocal or log (through
elementwise ops with constants) turns rounding into relative error, so a second pass measures
E[min(Δ^2 / 12x^2, 1)] over the nonzero elements and that counts too. A Gaussian tensor at its minmax
range keeps ~40 dB; below OUTLIER_DB (15 dB) a few channels or values stretch the range ~30x past what
the rest need.

Handling: where every reader is a MatMul/Gemm/Conv reading it as input 0 with a constant weight nothing
else reads, and its producer can take a per-channel factor (LayerNormalization's scale and bias; a
MatMul/Gemm/Conv's output channels and bias, through a bias Add and Relu), SmoothQuant's
s_j = sqrt(max|x_j| / max|W_j|) (Xiao et al. 2023, α 0.5) divides channel j in the producer and
multiplies it into the readers' weights (the float function is unchanged), if the estimate then reaches
OUTLIER_DB. Otherwise the tensor stays float: its readers, and its producer unless a MatMul/Gemm (which
writes float for float readers), are kept float. 16-bit activations are not used: ONNX Runtime's CPU has
no 16-bit integer kernels, so an A16 tensor costs its readers the same float compute plus Q/DQ
conversions (A16W8 models ran at 0.42-0.78x float); float is never slower and never less accurate.
Deterministic: float64 arithmetic, graph order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, TensorProto, numpy_helper

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex, node_attribute
from qtool.io.samples import DataSource
from qtool.numerics import QTYPES
from qtool.quantization.algorithms.equalization import _input_view, _scale_inputs
from qtool.quantization.algorithms.outlier_stats import RunFailed, relative_noise, statistics
from qtool.quantization.plan import Selection, tensor_types
from qtool.quantization.rules import FLOAT_OUTPUT_KERNELS
from qtool.recipe.schema import CalibrationSpec

OUTLIER_DB = 15.0  # estimated readers' SQNR from this tensor's 8-bit rounding below which it is an outlier tensor
ALPHA = 0.5  # SmoothQuant's migration strength
SCALE_LIMIT = 1e4  # no channel is scaled by more than this (nor less than its inverse)
LINEAR = ("MatMul", "Gemm", "Conv")
RELATIVE = ("Sqrt", "Reciprocal", "Log")  # readers whose output error follows the input's relative error
PASSING = ("Add", "Sub", "Mul", "Max", "Min", "Relu", "Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze")


@dataclass(frozen=True)
class OutlierTensor:
    """One outlier tensor and how it was handled (`handling`: "equalized" or "float": its readers, and its
    producer unless a MatMul/Gemm, which writes float for float readers, kept float)."""

    tensor: str
    handling: str
    estimated_db: float  # the readers' SQNR estimate at 8 bits, before
    estimated_db_after: float | None  # after equalization (None: kept float, so no rounding at all)
    channel_ratio: float  # max / median of the channels' max |x| (1 for a tensor measured as one channel)
    readers: tuple[str, ...]  # equalized: its readers, whose weights took s; float: the nodes kept float
    producer: str | None  # the node that took 1/s (equalized), else None
    why: str


@dataclass(frozen=True)
class OutlierOutcome:
    tensors: list[OutlierTensor]
    keep_float: dict[str, str]  # reader node -> why, for select_tensors
    measured: int  # tensors measured
    skipped: str | None = None  # why nothing was measured although on

    def as_dict(self) -> dict:
        """For report.json: figures rounded to 0.01, a non-finite one (a median channel of 0) as None."""
        def figure(value):
            return round(value, 2) if value is not None and math.isfinite(value) else None

        return {"threshold_db": OUTLIER_DB, "measured_tensors": self.measured,
                **({"skipped": self.skipped} if self.skipped else {}), "tensors": [
            {**t.__dict__, "readers": list(t.readers), "estimated_db": figure(t.estimated_db),
             "estimated_db_after": figure(t.estimated_db_after), "channel_ratio": figure(t.channel_ratio)}
            for t in self.tensors]}


def _weight_view(node, weight: np.ndarray) -> np.ndarray | None:
    """A linear reader's weight as [input channel, everything that channel multiplies]."""
    if node.op_type == "MatMul":
        return weight if weight.ndim == 2 else None
    if node.op_type == "Gemm":
        if node_attribute(node, "transA", 0) or weight.ndim != 2:
            return None
        return weight.T if node_attribute(node, "transB", 0) else weight
    return _input_view(weight, node_attribute(node, "group", 1) or 1) if weight.ndim >= 3 else None


def _scaled_weight(node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return _scale_inputs(weight, node_attribute(node, "group", 1) or 1, scale)
    if node.op_type == "Gemm" and node_attribute(node, "transB", 0):
        return weight * scale.reshape(1, -1)
    return weight * scale.reshape(-1, 1)


class _Weights:
    """Float64 values of initializers; those the pass changes are kept and written back once."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        found = self.arrays.get(name)
        return tensor_array(self.index.initializers[name]).astype(np.float64) if found is None else found

    def write(self) -> None:
        for name, array in sorted(self.arrays.items()):
            self.index.initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _linear_readers(index: GraphIndex, tensor: str) -> tuple[list, int, int] | None:
    """(readers, channels, axis) where every reader is a MatMul/Gemm/Conv reading `tensor` as input 0
    (and nowhere else) with a float initializer weight of one input-channel count; else None."""
    readers = index.consumers.get(tensor, [])
    if not readers or tensor in index.graph_outputs:
        return None
    channels, kinds = set(), set()
    for node in readers:
        if node.op_type not in LINEAR or node.input[0] != tensor or list(node.input).count(tensor) != 1 \
                or len(node.input) < 2 or node.input[1] not in index.initializers \
                or index.initializers[node.input[1]].data_type != TensorProto.FLOAT:
            return None
        init = index.initializers[node.input[1]]
        if node.op_type == "Conv":
            if len(init.dims) < 3:
                return None
            channels.add(init.dims[1] * (node_attribute(node, "group", 1) or 1))
        elif len(init.dims) != 2 or (node.op_type == "Gemm" and node_attribute(node, "transA", 0)):
            return None
        else:
            channels.add(init.dims[1] if node.op_type == "Gemm" and node_attribute(node, "transB", 0) else init.dims[0])
        kinds.add(node.op_type == "Conv")
    if len(channels) != 1 or len(kinds) != 1:
        return None
    return readers, channels.pop(), 1 if kinds.pop() else -1


def _relative(index: GraphIndex, tensor: str, depth: int = 4) -> bool:
    """Whether a reader divides by the tensor, takes its root or log (Div's divisor, Sqrt, Reciprocal, Log,
    Pow's base), directly or through elementwise ops with constant other inputs (a LayerNorm's variance
    + epsilon): there small values matter as much as large ones."""
    for node in index.consumers.get(tensor, []):
        if node.op_type in RELATIVE or (node.op_type in ("Div", "Pow") and node.input[1 if node.op_type == "Div" else 0] == tensor):
            return True
        others = [name for name in node.input if name and name != tensor]
        data = others if node.op_type in ("Add", "Sub", "Mul", "Max", "Min") else []  # not shapes, axes
        if depth and node.op_type in PASSING and node.output and all(name in index.initializers for name in data) \
                and _relative(index, node.output[0], depth - 1):
            return True
    return False


def _combinations(index: GraphIndex, tensor: str) -> list[tuple[str, str | None]]:
    """(output, the other factor or None) of each Add/Sub/Mul reader combining the tensor with another
    activation. Its error is the tensor's (times the other factor), its values can be far smaller: a
    variance E[x^2] - E[x]^2 from two large terms, a normalised (x - mean) * 1/std."""
    found = []
    for node in index.consumers.get(tensor, []):
        if node.op_type in ("Add", "Sub", "Mul") and node.output and len(set(node.input)) == 2 \
                and all(name not in index.initializers for name in node.input):
            other = next(name for name in node.input if name != tensor)
            found.append((node.output[0], other if node.op_type == "Mul" else None))
    return found


def _own(index: GraphIndex, name: str, node) -> bool:
    return bool(name) and name in index.initializers and name not in index.graph_outputs \
        and all(c is node for c in index.consumers.get(name, [])) \
        and index.initializers[name].data_type == TensorProto.FLOAT


def _sole(index: GraphIndex, tensor: str, reader) -> bool:
    return tensor not in index.graph_outputs and [id(c) for c in index.consumers.get(tensor, [])] == [id(reader)]


def _absorber(index: GraphIndex, tensor: str, channels: int, axis: int) -> tuple[object, list[tuple[str, int]]] | None:
    """(the producer that takes 1/s, [(initializer, the axis of its channels)]) for `tensor`, walking back
    through Relu and a bias Add; None where the producer cannot take a per-channel factor."""
    params: list[tuple[str, int]] = []
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "Relu" and _sole(index, node.input[0], node):
        node = index.producer.get(node.input[0])
    if node is not None and node.op_type == "Add" and axis == -1 and len(node.input) == 2:
        bias = [name for name in node.input if _own(index, name, node)]
        other = [name for name in node.input if name not in bias]
        if len(bias) != 1 or len(other) != 1 or list(index.initializers[bias[0]].dims) != [channels] \
                or not _sole(index, other[0], node):
            return None
        params.append((bias[0], 0))
        node = index.producer.get(other[0])
    if node is None:
        return None
    inputs = list(node.input) + [""] * 3
    if node.op_type == "LayerNormalization" and axis == -1 and node_attribute(node, "axis", -1) == -1 and not params:
        found = [(name, 0) for name in inputs[1:3] if name]
        ok = all(_own(index, name, node) and list(index.initializers[name].dims) == [channels] for name, _ in found)
        return (node, found) if ok else None
    if node.op_type in ("MatMul", "Gemm") and axis == -1 and _own(index, inputs[1], node) \
            and len(index.initializers[inputs[1]].dims) == 2 and not node_attribute(node, "transA", 0):
        out_axis = 0 if node.op_type == "Gemm" and node_attribute(node, "transB", 0) else 1
        if index.initializers[inputs[1]].dims[out_axis] != channels:
            return None
        params.append((inputs[1], out_axis))
        if node.op_type == "Gemm" and inputs[2]:
            if not _own(index, inputs[2], node) or list(index.initializers[inputs[2]].dims) != [channels]:
                return None
            params.append((inputs[2], 0))
        return node, params
    if node.op_type == "Conv" and axis == 1 and _own(index, inputs[1], node) \
            and index.initializers[inputs[1]].dims[0] == channels and not (inputs[2] and not _own(index, inputs[2], node)):
        return node, params + [(inputs[1], 0)] + ([(inputs[2], 0)] if inputs[2] else [])
    return None


def _step(stats: dict[str, np.ndarray], qtype: str, symmetric: bool, scale: np.ndarray | None = None) -> float:
    """The quantization step of the tensor's minmax range in `qtype`, channel j divided by scale[j]."""
    lo, hi = min(float(stats["lo"]), 0.0), max(float(stats["hi"]), 0.0)
    if scale is not None:  # the new range: each channel's peak over its s, on the sides the tensor had
        peak = float(np.max(stats["peak"] / scale))
        lo, hi = (-peak if lo < 0 else 0.0), (peak if hi > 0 else 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    return (hi - lo) / ((1 << QTYPES[qtype].bits) - 1)


def estimated_db(stats: dict[str, np.ndarray], qtype: str, symmetric: bool, energy: np.ndarray,
                 scale: np.ndarray | None = None, floor: float | None = None) -> float:
    """The readers' SQNR estimate (dB) from the tensor's rounding to `qtype`, channel j divided by
    scale[j] (none: 1); `energy[j]` = ‖W_j‖^2 of the readers' weights (scaled likewise); `floor`: the
    smallest mean square per unit of this tensor of an Add/Sub/Mul reader's output (its error is this
    tensor's, its values can be far smaller)."""
    s = np.ones_like(stats["peak"]) if scale is None else scale
    power = stats["square"] / max(float(stats["count"]) / stats["peak"].size, 1.0) / s ** 2
    noise = _step(stats, qtype, symmetric, scale) ** 2 / 12 * float(np.sum(energy))
    signal = float(np.sum(power * energy))
    if floor is not None:
        signal = min(signal, floor * float(np.sum(energy)))
    if noise <= 0 or signal <= 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def _ratio(peaks: np.ndarray) -> float:
    median = float(np.median(peaks))
    return float(peaks.max() / median) if median > 0 else math.inf


def handle_outliers(model: ModelProto, selection: Selection, data: DataSource, batch_size: int,
                    calibration: CalibrationSpec | None = None) -> tuple[ModelProto, OutlierOutcome]:
    """Measure every planned 8-bit activation of `model` on `data` that `calibration` ranges with minmax
    (other methods clip the range themselves; `auto` picks the clip per tensor); equalize the outlier
    tensors that can be (in place: the float function is unchanged) and keep the others float.
    Returns the model and the outcome, whose `keep_float` goes to `select_tensors`; where ONNX Runtime
    fails on the data, the model unchanged and the outcome's `skipped` says why (calibration, next,
    names the file)."""
    index = GraphIndex(model.graph)
    types = tensor_types(model)
    wanted: dict[str, tuple[int, int]] = {}
    linear: set[str] = set()
    for tensor, act in sorted(selection.activations.items()):
        if QTYPES[act.qtype].bits != 8 or types.get(tensor) != TensorProto.FLOAT or not index.consumers.get(tensor) \
                or (calibration is not None and calibration.for_tensor(act.range_of).method != "minmax"):
            continue
        found_linear = _linear_readers(index, tensor)
        if found_linear is not None:
            linear.add(tensor)
        wanted[tensor] = found_linear[1:] if found_linear is not None else (1, -1)
    if not wanted:
        return model, OutlierOutcome([], {}, 0)
    combined = {tensor: _combinations(index, tensor) for tensor in wanted if tensor not in linear}
    outputs = {output for pairs in combined.values() for output, _ in pairs}
    relative = {tensor for tensor in [*wanted, *outputs] if tensor not in linear and _relative(index, tensor)}
    others = {other for pairs in combined.values() for _, other in pairs if other}
    try:
        stats, mean_squares = statistics(model, wanted, outputs | others, relative, data, batch_size)
        if not stats:
            return model, OutlierOutcome([], {}, 0, "no calibration samples")
        steps = {tensor: _step(stats[tensor], selection.activations[tensor].qtype,
                               selection.activations[tensor].symmetric) for tensor in relative if tensor in wanted}
        noise = relative_noise(model, steps, data, batch_size) if steps else {}
    except RunFailed as exc:
        return model, OutlierOutcome([], {}, 0, f"ONNX Runtime failed on the calibration data: {exc}")
    weights = _Weights(index)
    found: list[OutlierTensor] = []
    keep_float: dict[str, str] = {}
    order = [value.name for value in model.graph.input] + [name for node in model.graph.node for name in node.output]
    for tensor in (name for name in order if name in wanted):
        act = selection.activations[tensor]
        readers = index.consumers[tensor]
        channels, axis = wanted[tensor]
        views = [_weight_view(r, weights[r.input[1]]) for r in readers] if tensor in linear else []
        energy = np.sum([np.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) for v in views], axis=0) if views \
            else np.ones(1)
        floor = min((mean_squares[out] / (mean_squares[other] if other else 1.0)
                     for out, other in combined.get(tensor, []) if not other or mean_squares[other] > 0), default=None)
        before = estimated_db(stats[tensor], act.qtype, act.symmetric, energy, floor=floor)
        if noise.get(tensor, 0.0) > 0:  # a root, reciprocal or log reads it: its relative error counts
            before = min(before, -10 * math.log10(noise[tensor]))
        finite = math.isfinite(float(stats[tensor]["lo"])) and math.isfinite(float(stats[tensor]["hi"]))
        if not finite or math.isnan(before) or before >= OUTLIER_DB:
            continue  # non-finite values: the plan keeps the tensor float itself (a degenerate range)
        ratio = _ratio(stats[tensor]["peak"])
        absorber = _absorber(index, tensor, channels, axis) if views and channels > 1 else None
        closed = absorber is not None and all(
            {id(c) for c in index.consumers[r.input[1]]} <= {id(x) for x in readers} for r in readers)
        after, scale = None, None
        if closed:
            peaks = stats[tensor]["peak"]
            w_max = np.max([np.abs(v.reshape(v.shape[0], -1)).max(axis=1) for v in views], axis=0)
            scale = np.ones_like(peaks)
            usable = (peaks > 0) & (w_max > 0)
            scale[usable] = peaks[usable] ** ALPHA / w_max[usable] ** (1 - ALPHA)
            scale = np.clip(scale, 1 / SCALE_LIMIT, SCALE_LIMIT)
            after = estimated_db(stats[tensor], act.qtype, act.symmetric, energy * scale ** 2, scale)
        names = tuple(r.name for r in readers)
        if after is not None and after >= OUTLIER_DB:
            producer, params = absorber
            for name in dict.fromkeys(r.input[1] for r in readers):  # a weight two readers share: once
                reader = next(r for r in readers if r.input[1] == name)
                weights.arrays[name] = _scaled_weight(reader, weights[name], scale)
            for name, param_axis in params:
                shape = [1] * weights[name].ndim
                shape[param_axis] = -1
                weights.arrays[name] = weights[name] / scale.reshape(shape)
            found.append(OutlierTensor(tensor, "equalized", before, after, ratio, names, producer.name,
                                       f"channels divided by s in {producer.name}, multiplied into the readers' weights"))
            continue
        why = ("its readers are not all MatMul/Gemm/Conv with their own constant weights" if not views else
               "its producer cannot take a per-channel factor" if not closed else
               f"equalization reaches only {after:.1f} dB")
        producer = index.producer.get(tensor)
        if producer is not None and producer.op_type not in FLOAT_OUTPUT_KERNELS:
            names += (producer.name,)  # a quantized Mul, Add, ... writes its output quantized: float too
        for name in names:
            keep_float[name] = (f"outlier input {tensor}: estimated {before:.1f} dB at 8 bits < {OUTLIER_DB:g}; "
                                f"{why} (quantization.algorithms.outliers)")
        found.append(OutlierTensor(tensor, "float", before, None, ratio, names, None, why))
    weights.write()
    return model, OutlierOutcome(found, keep_float, len(stats))
