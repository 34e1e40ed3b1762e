"""Float subgraphs ONNX Runtime fuses into one kernel: their nodes stay float, since Q/DQ pairs inside stop the fusion.

Today one pattern, the LayerNormalization that exporters before opset 17 write out (ORT's
LayerNormFusion, onnxruntime/core/optimizer/layer_norm_fusion.cc): x -> ReduceMean -> Sub(x, mean)
-> Pow(., 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x - mean, .) [-> Mul(gamma)] [-> Add(beta)].
Its Add and Mul are in the rule table; quantized, they leave nine float ops running one by one
where ORT runs one LayerNormalization kernel. Its output is still quantized for the layers that read it.
"""

from __future__ import annotations

from qtool.io.model import GraphIndex

LAYER_NORM = "part of a LayerNormalization written out in ops (ORT fuses it into one kernel; Q/DQ inside would stop that)"


def _only_reader(index: GraphIndex, tensor: str, op_type: str):
    readers = index.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None


def decomposed_layer_norms(graph) -> dict[str, str]:
    """Node name -> why it stays float, for every node of a written-out LayerNormalization."""
    index = GraphIndex(graph)
    kept: dict[str, str] = {}
    for mean in graph.node:
        if mean.op_type != "ReduceMean":
            continue
        x = mean.input[0]
        sub = next((n for n in index.consumers.get(mean.output[0], []) if n.op_type == "Sub" and n.input[0] == x
                    and n.input[1] == mean.output[0]), None)
        if sub is None:
            continue
        readers = index.consumers.get(sub.output[0], [])
        power = next((n for n in readers if n.op_type == "Pow"), None)
        divide = next((n for n in readers if n.op_type == "Div" and n.input[0] == sub.output[0]), None)
        if power is None or divide is None or len(readers) != 2:
            continue
        chain = [mean, sub, power, divide]
        variance = _only_reader(index, power.output[0], "ReduceMean")
        epsilon = variance and _only_reader(index, variance.output[0], "Add")
        root = epsilon and _only_reader(index, epsilon.output[0], "Sqrt")
        if root is None or divide.input[1] != root.output[0]:
            continue
        chain += [variance, epsilon, root]
        scale = _only_reader(index, divide.output[0], "Mul")
        shift = scale and _only_reader(index, scale.output[0], "Add")
        chain += [n for n in (scale, shift) if n is not None]
        kept.update({node.name: LAYER_NORM for node in chain})
    return kept
