"""Joining ops (Concat) whose inputs' ranges are too far apart to share one scale: which, and why.

A Concat's quantized output holds every input side by side under one scale. When one input spans
0..650 (a YOLO head's pixel boxes) and another 0..1 (its class scores), one uint8 scale has a step
of 2.5 and every score rounds to 0. Such a node is kept float: each input keeps the scale its
producer gave it, and the joined output is not requantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np


from qtool.io.external import tensor_array
from qtool.calibration.calibrate import CalibrationTable
from qtool.io.model import GraphIndex
from qtool.numerics import QTYPES, scale_zero_point
from qtool.quantization.rules import RULES

if TYPE_CHECKING:
    from qtool.quantization.plan import NodeDecision

# The fewest steps of the joined scale any input may span. Below it the input keeps under 4 bits of
# its own resolution: for uint8, inputs whose ranges differ more than 255 / 16 ~ 16x. The quantized
# Concats of the shared models keep 25 steps or more (u2netp's 51: 25.2 at the fewest, ppocr_det's
# one: 52.9; minmax ranges), so none is split; a YOLO head's class scores keep 0.36.
MIN_JOINED_STEPS = 16


def _input_range(name: str, index: GraphIndex, range_of: dict[str, str], table: CalibrationTable):
    if name in index.initializers:
        values = tensor_array(index.initializers[name])
        return (float(values.min()), float(values.max())) if values.size else None
    measured = table.ranges.get(range_of.get(name, name))
    return None if measured is None else (measured.lo, measured.hi)


def joins_to_split(graph, decisions: list[NodeDecision], range_of: dict[str, str],
                   table: CalibrationTable) -> dict[str, str]:
    """Node name -> why it stays float, for each quantized joining node an input of which would span
    fewer than MIN_JOINED_STEPS steps of the joined scale, and for the data-movement nodes that
    would otherwise requantize its output in one scale."""
    index = GraphIndex(graph)
    split: dict[str, str] = {}
    for node, decision in zip(graph.node, decisions):
        rule = RULES.get(node.op_type)
        if not decision.quantized or rule is None or not rule.joins_inputs or len(decision.activation_inputs) < 2:
            continue
        names = [node.input[i] for i in decision.activation_inputs]
        ranges = [_input_range(name, index, range_of, table) for name in names]
        if any(r is None or not all(np.isfinite(r)) for r in ranges):
            continue  # kept float for its own reasons; build_plan says so
        qtype, symmetric = QTYPES[decision.activations.dtype], decision.activations.symmetric
        joined = float(scale_zero_point(min(lo for lo, _ in ranges), max(hi for _, hi in ranges), qtype, symmetric)[0])
        widths = [max(hi, 0.0) - min(lo, 0.0) for lo, hi in ranges]
        if sum(width > 0 for width in widths) < 2:
            continue  # an all-zero input is exact under any scale
        narrow = min((i for i, width in enumerate(widths) if width > 0), key=widths.__getitem__)
        steps = widths[narrow] / joined
        if steps >= MIN_JOINED_STEPS:
            continue
        wide = int(np.argmax(widths))
        why = (f"kept float: its inputs' ranges differ {widths[wide] / widths[narrow]:.3g}x "
               f"({names[wide]} spans {widths[wide]:.4g}, {names[narrow]} {widths[narrow]:.4g}); one "
               f"{qtype.name} scale would leave {names[narrow]} {steps:.3g} steps (fewer than {MIN_JOINED_STEPS}), "
               "so each input keeps its own scale")
        split[node.name] = why
        _split_movers(node, index, decisions, graph, split)
    return split


def _split_movers(node, index: GraphIndex, decisions, graph, split: dict[str, str]) -> None:
    """Data-movement ops after a split join would quantize its output in one scale again: float too."""
    decided = {n.name: d for n, d in zip(graph.node, decisions)}
    pending = [(node.output[0], node.name)]
    while pending:
        tensor, join = pending.pop()
        for consumer in index.consumers.get(tensor, []):
            decision, rule = decided.get(consumer.name), RULES.get(consumer.op_type)
            if decision is not None and decision.quantized and rule is not None and rule.output == "shared" \
                    and consumer.name not in split and consumer.input[0] == tensor:
                split[consumer.name] = f"kept float: moves the output of {join}, whose inputs keep their own scales"
                pending.append((consumer.output[0], join))
