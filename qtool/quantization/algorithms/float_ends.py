"""`quantization.algorithms.keep_float`: the candidate float regions at a model's two ends, and their cost.

A layer is a quantized Conv, ConvTranspose, MatMul or Gemm with a constant weight. A node's depth is the
largest number of layers on a path from a graph input to it, itself included; its height the same
towards a graph output. The input region of depth k holds every quantized node of depth at most k (the
first k layers, what feeds them and the activations after the k-th up to the next layer's input); the
output region of depth k every quantized node of height at most k. Kept float, a region costs its
layers' multiply-accumulates run in float: `macs` counts them per layer from its weight and the shape
of the tensor it sweeps (Conv: output positions; ConvTranspose: input positions; MatMul: output rows;
Gemm: output rows).

Why the ends: rounding error made near the input passes through every later layer (ppocr_det's
MobileNetV3 stem: its first 4 layers, 3 % of the multiply-accumulates, bring the per-layer SQNR from
31 to 11.7 dB, and the output stays there), and error made near the output meets no layer that could
average it out. Keeping the first and last layers in higher precision is common practice in low-bit
quantization (e.g. Zhou et al. 2016, DoReFa-Net; Choi et al. 2018, PACT); here which depth, if any,
is measured on the calibration data (qtool.evaluation.float_choice). Deterministic: graph order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from qtool.quantization.plan import Selection

LAYER_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16)  # region depths tried at each end
MAC_BUDGET = 0.1  # the float regions together hold at most this fraction of the layers' multiply-accumulates


@dataclass(frozen=True)
class Region:
    """One candidate: `end` "input" or "output", `depth` layers deep, the quantized `nodes` it keeps
    float (graph order), its `layers`, and `macs_fraction` of the model's layers' multiply-accumulates."""

    end: str
    depth: int
    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    macs_fraction: float


def layers(model: ModelProto, selection: Selection) -> list[str]:
    """The quantized layers (constant-weight Conv, ConvTranspose, MatMul, Gemm) in graph order."""
    ops = {node.name: node.op_type for node in model.graph.node}
    return [d.node for d in selection.nodes if d.quantized and d.weight_input is not None
            and ops.get(d.node) in LAYER_OPS]


def layer_macs(model: ModelProto, selection: Selection, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Multiply-accumulates of each layer on one run: weight elements times the positions it sweeps,
    from `shapes` (tensor -> shape on that run); a layer whose tensor has no shape counts its weight
    elements alone."""
    nodes = {node.name: node for node in model.graph.node}
    weights = {init.name: init for init in model.graph.initializer}
    decisions = {d.node: d for d in selection.nodes}
    macs: dict[str, float] = {}
    for name in layers(model, selection):
        node, decision = nodes[name], decisions[name]
        weight = weights.get(node.input[decision.weight_input])
        size = float(np.prod(weight.dims)) if weight is not None else 1.0
        swept = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
        if swept is None or not swept:
            positions = 1.0
        elif node.op_type in ("Conv", "ConvTranspose"):
            positions = float(swept[0] * np.prod(swept[2:], dtype=np.float64))
        else:  # MatMul, Gemm: every output row
            positions = float(np.prod(swept[:-1], dtype=np.float64))
        macs[name] = size * positions
    return macs


def _levels(model: ModelProto, counted: set[str], towards_output: bool) -> dict[str, int]:
    """Depth (from the inputs) or height (from the outputs) of every node, in layers counted."""
    graph_nodes = list(model.graph.node)
    producer = {out: node.name for node in graph_nodes for out in node.output if out}
    before: dict[str, list[str]] = {}  # node -> the nodes whose level it builds on
    for node in graph_nodes:
        for name in node.input:
            if name in producer:
                if towards_output:
                    before.setdefault(producer[name], []).append(node.name)
                else:
                    before.setdefault(node.name, []).append(producer[name])
    if towards_output:
        graph_nodes = graph_nodes[::-1]
    level: dict[str, int] = {}
    for node in graph_nodes:  # graph order is topological (ONNX requires it)
        deepest = max((level.get(other, 0) for other in before.get(node.name, ())), default=0)
        level[node.name] = deepest + (node.name in counted)
    return level


def candidate_regions(model: ModelProto, selection: Selection, macs: dict[str, float]) -> list[Region]:
    """Input regions, then output regions, of the DEPTHS, each within MAC_BUDGET and leaving at least
    one layer quantized; a region equal to a shallower one of its end is left out."""
    counted = layers(model, selection)
    total = sum(macs.values()) or 1.0
    quantized = [d.node for d in selection.nodes if d.quantized]
    regions: list[Region] = []
    for end in ("input", "output"):
        level = _levels(model, set(counted), towards_output=end == "output")
        seen: set[tuple[str, ...]] = set()
        for depth in DEPTHS:
            nodes = tuple(name for name in quantized if level.get(name, 0) <= depth)
            kept_layers = tuple(name for name in counted if name in set(nodes))
            fraction = sum(macs.get(name, 0.0) for name in kept_layers) / total
            if fraction > MAC_BUDGET or len(kept_layers) >= len(counted):
                break
            if not kept_layers or nodes in seen:
                continue
            seen.add(nodes)
            regions.append(Region(end, depth, nodes, kept_layers, fraction))
    return regions
