"""Quantization arithmetic checked against ONNX's reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qtool.numerics import (
    QTYPES, block_ranges, dequantize, is_sane_scale, quant_bounds, quantize, scale_zero_point,
)


def reference_qdq(x, scale, zero_point, axis, block_size=None, opset=19):
    kwargs = {"axis": axis} if axis is not None else {}
    if block_size:
        kwargs["block_size"] = block_size
    elem = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kwargs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kwargs)]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", elem, None)],
        [helper.make_tensor_value_info("q", elem, None), helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {"x": x, "s": scale, "z": zero_point})


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_onnx_reference(dtype, symmetric):
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 2.0, size=(4, 7)).astype(np.float32)
    scale, zp = scale_zero_point(x.min() * 0.8, x.max() * 0.8, QTYPES[dtype], symmetric)  # forces saturation
    q = quantize(x, scale, zp, QTYPES[dtype])
    ref_q, ref_y = reference_qdq(x, scale, zp, None)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(dequantize(q, scale, zp), ref_y)
    assert q.min() == QTYPES[dtype].qmin or q.max() == QTYPES[dtype].qmax


def test_per_channel_matches_onnx_reference():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3, 2, 2)).astype(np.float32)
    lo, hi = w.reshape(5, -1).min(1), w.reshape(5, -1).max(1)
    scale, zp = scale_zero_point(lo, hi, QTYPES["int8"], symmetric=True)
    q = quantize(w, scale, zp, QTYPES["int8"], axis=0)
    ref_q, ref_y = reference_qdq(w, scale, zp, 0)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=0), ref_y)


def test_rounds_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    q = quantize(x, np.float32(1.0), np.int8(0), QTYPES["int8"])
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2])
    np.testing.assert_array_equal(q, reference_qdq(x, np.float32(1.0), np.int8(0), None)[0])


def test_zero_is_exact_and_range_contains_it():
    scale, zp = scale_zero_point(0.5, 3.0, QTYPES["uint8"], symmetric=False)
    assert zp == 0  # range widened down to 0
    assert dequantize(quantize(np.zeros(1, np.float32), scale, zp, QTYPES["uint8"]), scale, zp)[0] == 0.0


def test_symmetric_int8_uses_restricted_range_and_reduce_range_halves_it():
    assert quant_bounds(QTYPES["int8"], symmetric=True) == (-127, 127)
    assert quant_bounds(QTYPES["int8"], symmetric=True, reduce_range=True) == (-63, 63)
    scale, _ = scale_zero_point(-1.0, 1.0, QTYPES["int8"], symmetric=True, reduce_range=True)
    assert scale == pytest.approx(1 / 63)


def test_degenerate_ranges_are_flagged():
    scale, _ = scale_zero_point(0.0, 0.0, QTYPES["uint8"], symmetric=False)
    assert scale == 1.0
    assert not is_sane_scale(np.array([np.inf]))
    assert not is_sane_scale(np.array([0.0]))
    assert is_sane_scale(np.array([0.01, 2.0]))


ALL_TYPES = ["uint8", "int8", "uint16", "int16", "uint4", "int4"]


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_type_matches_onnx_reference_at_opset_21(dtype, symmetric):
    """Per-tensor scale/zero point, rounding and saturation for every type against onnx.reference."""
    qtype = QTYPES[dtype]
    rng = np.random.default_rng(2)
    x = rng.normal(0.3, 2.0, size=(6, 9)).astype(np.float32)
    scale, zp = scale_zero_point(x.min() * 0.7, x.max() * 0.7, qtype, symmetric)  # forces saturation
    q = quantize(x, scale, zp, qtype)
    ref_q, ref_y = reference_qdq(x, scale, zp, None, opset=21)
    np.testing.assert_array_equal(q.astype(np.int64), ref_q.astype(np.int64))
    np.testing.assert_array_equal(dequantize(q, scale, zp), ref_y)
    assert q.astype(np.int64).min() == qtype.qmin or q.astype(np.int64).max() == qtype.qmax
    assert q.dtype == np.dtype(qtype.numpy)


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_half_to_even_and_saturation_for_every_type(dtype):
    qtype = QTYPES[dtype]
    zp = np.array(0 if qtype.signed else 2, dtype=qtype.numpy)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1e6, -1e6], np.float32)
    q = quantize(x, np.float32(1.0), zp, qtype).astype(np.int64)
    offset = int(zp.astype(np.int64))
    assert list(q[:5]) == [min(v + offset, qtype.qmax) if v + offset >= qtype.qmin else qtype.qmin
                           for v in [0, 2, 2, 0, -2]]
    assert (q[5], q[6]) == (qtype.qmax, qtype.qmin)
    np.testing.assert_array_equal(q, reference_qdq(x, np.float32(1.0), zp, None, opset=21)[0].astype(np.int64))


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "int16"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_block_matches_onnx_reference(dtype, symmetric):
    """Blocked quantization (opset 21) on the reduction axis, with a short last block."""
    qtype = QTYPES[dtype]
    rng = np.random.default_rng(3)
    w = rng.normal(size=(40, 6)).astype(np.float32)  # K=40, blocks of 16: 16, 16, 8
    lo, hi = block_ranges(w, 0, 16)
    assert lo.shape == (3, 6)
    np.testing.assert_array_equal(hi[2], w[32:].max(axis=0))
    scale, zp = scale_zero_point(lo, hi, qtype, symmetric)
    q = quantize(w, scale, zp, qtype, axis=0, block_size=16)
    ref_q, ref_y = reference_qdq(w, scale, zp, 0, block_size=16, opset=21)
    np.testing.assert_array_equal(q.astype(np.int64), ref_q.astype(np.int64))
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=0, block_size=16), ref_y)
    error = np.abs(dequantize(q, scale, zp, axis=0, block_size=16) - w).max()
    assert error <= np.repeat(scale, 16, axis=0)[:40].max() * 0.51 + 1e-6


def test_sixteen_bit_activations_are_256x_finer_than_eight():
    s8, _ = scale_zero_point(-1.0, 3.0, QTYPES["uint8"], symmetric=False)
    s16, z16 = scale_zero_point(-1.0, 3.0, QTYPES["uint16"], symmetric=False)
    assert float(s8 / s16) == pytest.approx(65535 / 255)
    assert z16.dtype == np.uint16 and int(z16) == round(65535 / 4)
    _, zsym = scale_zero_point(-1.0, 3.0, QTYPES["uint16"], symmetric=True)
    assert int(zsym) == 32768
