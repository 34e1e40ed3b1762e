"""Pure numpy quantization arithmetic: ranges to scale/zero point, quantize, dequantize.

Conventions follow ONNX QuantizeLinear: q = saturate(round_half_even(x / scale) + zp).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class QType:
    """An integer type that QuantizeLinear can produce."""

    name: str
    numpy: type
    onnx: int
    qmin: int
    qmax: int

    # Lowest default-domain opset whose QuantizeLinear/DequantizeLinear take the type.
    min_opset: int = 13

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return int(self.qmax - self.qmin).bit_length()


# int4/uint4 are stored as ml_dtypes arrays, which onnx.numpy_helper packs two to a byte.
QTYPES = {
    "uint8": QType("uint8", np.uint8, TensorProto.UINT8, 0, 255),
    "int8": QType("int8", np.int8, TensorProto.INT8, -128, 127),
    "uint16": QType("uint16", np.uint16, TensorProto.UINT16, 0, 65535, min_opset=21),
    "int16": QType("int16", np.int16, TensorProto.INT16, -32768, 32767, min_opset=21),
    "uint4": QType("uint4", ml_dtypes.uint4, TensorProto.UINT4, 0, 15, min_opset=21),
    "int4": QType("int4", ml_dtypes.int4, TensorProto.INT4, -8, 7, min_opset=21),
    "int32": QType("int32", np.int32, TensorProto.INT32, -(2**31), 2**31 - 1),
}
BLOCKED_MIN_OPSET = 21  # DequantizeLinear gains `block_size`


def quant_bounds(qtype: QType, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """The integer interval a tensor may use.

    Symmetric signed types drop the most negative value (int8: [-127, 127]) so
    that zero sits exactly in the middle; `reduce_range` halves the interval
    (7 bits) to keep uint8 x int8 kernels without VNNI from saturating.
    """
    qmin, qmax = qtype.qmin, qtype.qmax
    if symmetric and qtype.signed:
        qmin = -qmax
    if reduce_range:
        half = (qmax - qmin) // 2
        if qtype.signed:
            qmin, qmax = -(half // 2), half // 2
        else:
            qmin, qmax = 0, half
    return qmin, qmax


def scale_zero_point(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    qtype: QType,
    symmetric: bool,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (qtype) mapping [lo, hi] onto the type.

    The range is widened to contain 0 so that zero is exactly representable
    (padding, ReLU). Works elementwise for per-channel ranges. A zero-width
    range gives scale 1 (every value is 0); callers check `is_sane_scale`.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = quant_bounds(qtype, symmetric, reduce_range)
    if symmetric:
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        scale = absmax / ((qmax - qmin) / 2.0)
        zero_point = np.full_like(scale, (qmin + qmax + 1) // 2 if not qtype.signed else 0)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.where(scale > 0, np.rint(qmin - lo / scale), qmin)
    scale = np.where(scale > 0, scale, 1.0)
    zero_point = np.clip(zero_point, qtype.qmin, qtype.qmax)
    return scale.astype(np.float32), zero_point.astype(qtype.numpy)


def is_sane_scale(scale: np.ndarray) -> bool:
    """False for scales that would corrupt a model: inf, nan, zero or absurd."""
    scale = np.asarray(scale, dtype=np.float64)
    return bool(np.all(np.isfinite(scale)) and np.all(scale > 1e-30) and np.all(scale < 1e10))


def broadcast_param(param: np.ndarray, shape: tuple, axis: int | None, block_size: int | None = None) -> np.ndarray:
    """Per-tensor, per-axis (1-D) or blocked (same rank as the tensor) parameters, made broadcastable."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    if block_size:
        return np.repeat(param, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = param.size
    return param.reshape(view)


QUANTIZE_CHUNK = 1 << 22  # elements quantize works on at once


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qtype: QType,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, add zero point, saturate.

    With `block_size`, `scale` and `zero_point` have the tensor's rank and
    ceil(n / block_size) entries along `axis` (opset-21 blocked quantization).
    A tensor past QUANTIZE_CHUNK elements is done a slice of rows at a time (the same values:
    every step is elementwise), so the scratch stays ~40 bytes x QUANTIZE_CHUNK, not x its size.
    """
    s = broadcast_param(scale, x.shape, axis, block_size).astype(np.float32)
    zp = broadcast_param(zero_point, x.shape, axis, block_size).astype(np.float64)
    if x.ndim == 0 or x.size <= QUANTIZE_CHUNK:
        return _quantize(x, s, zp, qtype)
    out = np.empty(x.shape, qtype.numpy)
    step = max(1, QUANTIZE_CHUNK // (x.size // x.shape[0]))
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = _quantize(x[rows], *(p[rows] if p.ndim and p.shape[0] > 1 else p for p in (s, zp)), qtype)
    return out


def _quantize(x: np.ndarray, s: np.ndarray, zp: np.ndarray, qtype: QType) -> np.ndarray:
    q = np.rint(x.astype(np.float32) / s).astype(np.float64) + zp
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.numpy)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    s = broadcast_param(scale, q.shape, axis, block_size).astype(np.float32)
    zp = broadcast_param(zero_point, q.shape, axis, block_size).astype(np.int64)
    return ((q.astype(np.int64) - zp).astype(np.float32) * s).astype(np.float32)


def channel_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of a weight over everything but `axis` (None: whole tensor)."""
    if axis is None:
        return np.asarray(w.min(), np.float64), np.asarray(w.max(), np.float64)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1).astype(np.float64), moved.max(axis=1).astype(np.float64)


def block_ranges(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each run of `block_size` elements along `axis` (the last run may be short).

    The results keep the tensor's rank with ceil(n / block_size) entries along
    `axis`: the layout of an opset-21 blocked scale.
    """
    n = w.shape[axis]
    blocks = -(-n // block_size)
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    padded = np.concatenate([moved, np.repeat(moved[-1:], blocks * block_size - n, axis=0)])
    grouped = padded.reshape((blocks, block_size) + moved.shape[1:])
    return np.moveaxis(grouped.min(axis=1), 0, axis), np.moveaxis(grouped.max(axis=1), 0, axis)


def mse_block_ranges(
    w: np.ndarray, axis: int, block_size: int, qtype: QType, symmetric: bool,
    shrink: tuple[float, ...] = tuple(np.linspace(1.0, 0.6, 17)),
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block ranges shrunk by the factor (from `shrink`) that minimises each block's squared error.

    Few-bit blocks gain from clipping their largest values: the step shrinks
    for every other value. 1.0 (plain min/max) is always a candidate.
    """
    lo, hi = block_ranges(w, axis, block_size)
    best_lo, best_hi = lo, hi
    best_err = None
    for factor in shrink:
        scale, zero_point = scale_zero_point(lo * factor, hi * factor, qtype, symmetric)
        q = quantize(w, scale, zero_point, qtype, axis, block_size)
        err_sq = (dequantize(q, scale, zero_point, axis, block_size) - w).astype(np.float64) ** 2
        err = _block_sums(err_sq, axis, block_size)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo * factor, hi * factor
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, lo * factor, best_lo)
        best_hi = np.where(better, hi * factor, best_hi)
    return best_lo, best_hi


def _block_sums(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    n = x.shape[axis]
    blocks = -(-n // block_size)
    moved = np.moveaxis(x, axis, 0)
    pad = np.zeros((blocks * block_size - n,) + moved.shape[1:], moved.dtype)
    summed = np.concatenate([moved, pad]).reshape((blocks, block_size) + moved.shape[1:]).sum(axis=1)
    return np.moveaxis(summed, 0, axis)


def gptq_round(
    w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int, hessian: np.ndarray,
    damp: float = 0.01, block: int = 128,
) -> np.ndarray:
    """Integer codes of `w` [..., rows, d] that minimise the output error on inputs with E[x xᵀ] = `hessian`.

    GPTQ (Frantar et al., 2022): columns are rounded one at a time, each one's error
    pushed onto the columns not yet rounded through the upper Cholesky factor of H⁻¹,
    so that correlated inputs cancel it. `scale` and `zero_point` have w's shape (any
    granularity, broadcast); `hessian` is [..., d, d] (leading dims: groups, batched),
    damped by `damp` x its mean diagonal. Inputs never seen (zero diagonal) keep
    round-to-nearest and push no error.
    """
    w = w.astype(np.float64).copy()
    scale, zero_point = scale.astype(np.float64), zero_point.astype(np.float64)
    h = hessian.astype(np.float64).copy()
    d = w.shape[-1]
    diagonal = np.diagonal(h, axis1=-2, axis2=-1)
    live = (diagonal > 0).astype(np.float64)
    h *= live[..., :, None] * live[..., None, :]
    mean = np.maximum(np.diagonal(h, axis1=-2, axis2=-1).mean(axis=-1), 1e-12)
    h += np.eye(d) * ((1.0 - live) + damp * mean[..., None])[..., None, :]
    upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), -1, -2)  # H⁻¹ = Uᵀ U
    codes = np.empty(w.shape, np.float64)
    for start in range(0, d, block):
        stop = min(start + block, d)
        errors = np.empty(w.shape[:-1] + (stop - start,))
        for i in range(start, stop):
            q = np.clip(np.rint(w[..., i] / scale[..., i]) + zero_point[..., i], qmin, qmax)
            codes[..., i] = q
            error = (w[..., i] - (q - zero_point[..., i]) * scale[..., i]) / upper[..., i, i, None]
            errors[..., i - start] = error
            w[..., i + 1:stop] -= error[..., None] * upper[..., None, i, i + 1:stop]
        w[..., stop:] -= errors @ upper[..., start:stop, stop:]
    return codes
