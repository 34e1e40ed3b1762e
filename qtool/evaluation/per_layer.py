"""Per-layer error: match quantized tensors to float ones through the Q/DQ pairs, then measure.

An activation matches when a QuantizeLinear reads a tensor the float model
also has (or reads a renamed output of a node the float model also has, at
the same output position); its DequantizeLinear output is the quantized
value. A weight matches through the node and input position that read its
DequantizeLinear output. Names are never parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
from onnx import ModelProto, helper

from qtool.io.external import tensor_array
from qtool.evaluation.compare import OutputStats
from qtool.io.data import DataFolder
from qtool.io.model import GraphIndex
from qtool.numerics import dequantize
from qtool.runtime.session import make_session, run, with_outputs
from qtool.runtime.streams import StateCarry


@dataclass(frozen=True)
class ActivationMatch:
    float_tensor: str
    quantized_tensor: str  # the DequantizeLinear output in the candidate
    node: str  # the float model's producer ("" for a graph input)
    op_type: str


def _constants(model: ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    return values


def match_activations(reference: ModelProto, candidate: ModelProto) -> tuple[list[ActivationMatch], int]:
    """Quantized activations of `candidate` and their float tensors in `reference`; plus the unmatched count."""
    ref, cand = GraphIndex(reference.graph), GraphIndex(candidate.graph)
    ref_nodes = {node.name: node for node in reference.graph.node if node.name}
    ref_tensors = set(ref.producer) | ref.graph_inputs
    matches: dict[str, ActivationMatch] = {}
    unmatched = 0
    for node in candidate.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in cand.initializers:
            continue
        dqs = [c for c in cand.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs:
            continue
        source = node.input[0]
        float_tensor = source if source in ref_tensors else None
        if float_tensor is None:
            # The producer's output was renamed (graph-output case): same node, same position.
            producer = cand.producer.get(source)
            twin = ref_nodes.get(producer.name) if producer is not None and producer.name else None
            if twin is not None:
                position = list(producer.output).index(source)
                if position < len(twin.output):
                    float_tensor = twin.output[position]
        if float_tensor is None or float_tensor in ref.initializers:
            unmatched += 1
            continue
        producer = ref.producer.get(float_tensor)
        matches.setdefault(float_tensor, ActivationMatch(
            float_tensor, dqs[0].output[0], producer.name if producer is not None else "",
            producer.op_type if producer is not None else "graph input"))
    return list(matches.values()), unmatched


def layer_errors(
    reference: ModelProto,
    candidate: ModelProto,
    data: DataFolder,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int | None], None] | None = None,
) -> tuple[list[dict], int]:
    """Figures per matched activation, worst SQNR first; plus the number left unmatched."""
    matches, unmatched = match_activations(reference, candidate)
    if not matches:
        return [], unmatched
    ref_session = make_session(with_outputs(reference, [m.float_tensor for m in matches]))
    cand_session = make_session(with_outputs(candidate, [m.quantized_tensor for m in matches]))
    stats = {m.float_tensor: OutputStats(classifier=False, slices=False) for m in matches}
    total = data.total or 0
    samples = 0
    ref_carry, cand_carry = StateCarry(data.state), StateCarry(data.state)
    for batch in data.batches(batch_size):
        ref_out = ref_carry.run(partial(run, ref_session), batch)
        cand_out = cand_carry.run(partial(run, cand_session), batch)
        for match in matches:
            a, b = ref_out[match.float_tensor], cand_out[match.quantized_tensor]
            if a.shape == b.shape:
                stats[match.float_tensor].update(a, b)
        samples += len(batch.files)
        if progress:
            progress(samples, max(total, samples))
    rows = []
    for match in matches:
        if not stats[match.float_tensor].count:
            unmatched += 1
            continue
        figures = stats[match.float_tensor].figures(histogram=False)
        rows.append({"tensor": match.float_tensor, "quantized_tensor": match.quantized_tensor,
                     "node": match.node, "op_type": match.op_type, **figures})
    rows.sort(key=lambda row: row["sqnr_db"])
    return rows, unmatched


def weight_errors(reference: ModelProto, candidate: ModelProto) -> list[dict]:
    """Dequantized integer initializers against the float values their readers had; worst SQNR first."""
    ref_nodes = {node.name: node for node in reference.graph.node if node.name}
    ref_values = _constants(reference)
    cand = GraphIndex(candidate.graph)
    rows: dict[str, dict] = {}
    for node in candidate.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in cand.initializers:
            continue
        try:
            q = tensor_array(cand.initializers[node.input[0]])
            scale = tensor_array(cand.initializers[node.input[1]])
            zero_point = (tensor_array(cand.initializers[node.input[2]])
                          if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=np.int64))
        except KeyError:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        for reader in cand.consumers.get(node.output[0], []):
            twin = ref_nodes.get(reader.name)
            if twin is None:
                continue
            for position, name in enumerate(reader.input):
                if name != node.output[0] or position >= len(twin.input):
                    continue
                float_name = twin.input[position]
                if float_name in rows or float_name not in ref_values:
                    continue
                expected = tensor_array(ref_values[float_name]).astype(np.float32)
                try:
                    restored = dequantize(q, scale, zero_point, axis % q.ndim if scale.ndim == 1 and q.ndim else None)
                except ValueError:
                    continue  # a layout this check does not know (blocked scales)
                if restored.shape != expected.shape:
                    continue
                stats = OutputStats(classifier=False, slices=False)
                stats.update(expected.reshape(1, -1), restored.reshape(1, -1))
                figures = stats.figures(histogram=False)
                rows[float_name] = {
                    "tensor": float_name, "node": reader.name, "op_type": reader.op_type, "input": position,
                    "dtype": helper.tensor_dtype_to_np_dtype(cand.initializers[node.input[0]].data_type).name,
                    "per_channel": bool(scale.ndim == 1 and scale.size > 1), **figures,
                }
    return sorted(rows.values(), key=lambda row: row["sqnr_db"])


def layers_section(activations: list[dict], weights: list[dict], unmatched: int,
                   reasons: dict[str, str] | None = None) -> dict:
    """Per-layer figures, worst SQNR first; `reasons` (node -> plan reason) adds the recipe rule."""
    if reasons:
        activations = [{**row, "rule": reasons.get(row["node"])} for row in activations]
        weights = [{**row, "rule": reasons.get(row["node"])} for row in weights]
    return {
        "activations": activations,
        "weights": weights,
        "unmatched": unmatched,
        "note": "measured with the matched tensors exposed as model outputs, which can stop ONNX Runtime "
                "fusing the nodes that read them",
    }
