"""Attention masks: a tensor read only by Softmax gets a range that starts no lower than SOFTMAX_FLOOR.

Additive masks put -10000 or the float32 minimum (-3.4e38) where a token may not be attended to;
calibrated min/max then spans the mask, and one 8-bit scale over [-10000, 40] rounds every real
score to the same few steps (a tiny encoder: 1.8 dB). Softmax gives a logit e^-64 below its row's
largest no weight that float32 can tell from 0 next to it, so clamping the range at -64 changes
nothing the float model computes (rows whose every logit lies below -64 are fully masked rows,
which no one reads) and keeps the scale of the scores.
"""

from __future__ import annotations

from qtool.quantization.rules import RULES

SOFTMAX_FLOOR = -64.0
SOFTMAX_OPS = ("Softmax", "LogSoftmax")


def softmax_only(graph, decisions) -> set[str]:
    """Tensors whose every reader is a Softmax (input 0), directly or through quantized data-movement
    ops that share their range (Reshape, Transpose, ...); graph outputs never."""
    consumers: dict[str, list[tuple[object, object]]] = {}
    for node, decision in zip(graph.node, decisions):
        for name in node.input:
            consumers.setdefault(name, []).append((node, decision))
    outputs = {value.name for value in graph.output}
    memo: dict[str, bool] = {}

    def only_softmax(tensor: str) -> bool:
        if tensor not in memo:
            memo[tensor] = False  # a cycle guard; graphs are acyclic
            readers = consumers.get(tensor, [])
            memo[tensor] = bool(readers) and tensor not in outputs and all(
                (node.op_type in SOFTMAX_OPS and node.input[0] == tensor)
                or (decision.quantized and node.op_type in RULES and RULES[node.op_type].output == "shared"
                    and node.input[0] == tensor and only_softmax(node.output[0]))
                for node, decision in readers)
        return memo[tensor]

    return {name for name in consumers if only_softmax(name)}
