"""Per-op quantization behaviour: one literal table, one entry per ONNX op type.

An entry says which inputs are activations, which input is the weight (and
its per-channel axis) and the bias, and how the output is quantized. Op types
not in the table stay float. Adding an op is one entry and one test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ALL = "all"

# own:    the output gets its own calibrated range.
# shared: the output reuses input 0's scale and zero point (data movement ops),
#         so ONNX Runtime can run the op on integers and drop the Q/DQ pair.
OutputMode = Literal["own", "shared"]


@dataclass(frozen=True)
class OpRule:
    activations: tuple[int, ...] | str = (0,)
    weight: int | None = None
    weight_axis: int | Literal["gemm"] | None = None
    # The weight axis summed over (input channels, K): where per_block blocks run.
    reduction_axis: int | Literal["gemm"] | None = None
    bias: int | None = None
    # Weight ranks whose `weight_axis` is an output-channel axis ONNX Runtime's integer kernels
    # take per-channel scales on; other ranks are quantized per_tensor (None: every rank).
    channel_ranks: tuple[int, ...] | None = None
    output: OutputMode = "own"
    # Relu/Clip: the producer's output is left unquantized and this op's output
    # range stands for both, so ORT removes the activation inside the int kernel.
    fuses_into_producer: bool = False
    # Concat: the output holds the inputs side by side under one scale; inputs whose ranges are
    # too far apart for that keep the node float (quantization/joins.py).
    joins_inputs: bool = False


_MOVE = OpRule(output="shared")

RULES: dict[str, OpRule] = {
    "Conv": OpRule(weight=1, weight_axis=0, reduction_axis=1, bias=2),
    "ConvTranspose": OpRule(weight=1, weight_axis=1, reduction_axis=0, bias=2),
    "Gemm": OpRule(weight=1, weight_axis="gemm", reduction_axis="gemm", bias=2),
    # A 1-D weight [K] has no output axis; a batched [..., K, N] one fails in MatMulIntegerToFloat
    # ("b zero point is not valid") and never fuses into QLinearMatMul per channel.
    "MatMul": OpRule(weight=1, weight_axis=-1, reduction_axis=-2, channel_ranks=(2,)),
    "Add": OpRule(activations=ALL),
    "Mul": OpRule(activations=ALL),
    "Relu": OpRule(activations=(), fuses_into_producer=True),
    "Clip": OpRule(activations=(), fuses_into_producer=True),
    "MaxPool": _MOVE,
    "AveragePool": OpRule(),
    "GlobalAveragePool": OpRule(),
    "Concat": OpRule(activations=ALL, joins_inputs=True),
    "Resize": _MOVE,
    "Reshape": _MOVE,
    "Transpose": _MOVE,
    "Flatten": _MOVE,
    "Squeeze": _MOVE,
    "Unsqueeze": _MOVE,
    "Slice": _MOVE,  # starts/ends/axes/steps are int64: only input 0 is an activation
    "Sigmoid": OpRule(),
    "LeakyRelu": OpRule(),  # QLinearLeakyRelu
    "HardSigmoid": OpRule(),
    "Softmax": OpRule(),
    "Where": OpRule(activations=(1, 2)),  # input 0 is the bool condition; QLinearWhere (com.microsoft)
}

# Ops whose float output ONNX Runtime can produce straight from integer inputs
# (QGemm, MatMulIntegerToFloat): a graph output they produce stays float.
FLOAT_OUTPUT_KERNELS = {"Gemm", "MatMul"}


def activation_inputs(rule: OpRule, input_count: int) -> list[int]:
    if rule.activations == ALL:
        return list(range(input_count))
    return [index for index in rule.activations if index < input_count]
