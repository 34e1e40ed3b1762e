"""What the Conv folds in prepare and forward_folding read the same way: a Conv's bias, and a
constant that varies by channel only."""

from __future__ import annotations

import numpy as np
import onnx

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex


def conv_bias(index: GraphIndex, conv: onnx.NodeProto) -> np.ndarray:
    """The Conv's bias in float64 ([M]), zeros when it has none."""
    if len(conv.input) > 2 and conv.input[2]:
        return tensor_array(index.initializers[conv.input[2]]).astype(np.float64)
    return np.zeros(index.initializers[conv.input[1]].dims[0])


def channel_vector(constant: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """The constant as a [C] float64 vector when it broadcasts over [N, C, spatial...] (rank dims) by
    channel only (a scalar included); None when it varies along any other axis."""
    if constant.ndim > rank:
        return None
    if constant.size == 1:
        return np.full(channels, float(constant.reshape(())))
    padded = (1,) * (rank - constant.ndim) + constant.shape
    if padded[0] == 1 and padded[1] == channels and all(d == 1 for d in padded[2:]):
        return constant.reshape(channels).astype(np.float64)
    return None
