"""Written-out hard-swish among the nodes a plan keeps float, rewritten as one ONNX HardSwish.

MobileNetV3-style exporters (PaddlePaddle's, ppocr_det) write hard-swish as Add(x, 3) -> Clip(0, 6) ->
Mul(x, .), its 1/6 folded into the next layer by prepare. Quantized, that is QLinearAdd and QLinearMul;
kept float (keep_float's stem), ONNX Runtime runs it as three passes over the tensor plus the layout
reorders around its blocked-layout Conv, where a HardSwish it fuses into the Conv before it (ppocr_det's
two stem blocks: 2.5 ms of Add/Clip/Mul and reorders against 0.6 ms). Rewritten, 6 * HardSwish(x): the
factor 6 goes into the weights of a float Conv that reads it alone (through a scalar Add, divided by 6),
else one Mul. The function is the float model's up to float rounding; the rewrite runs after the plan,
whose decisions and ranges it does not touch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper, version_converter

from qtool.io.external import tensor_array
from qtool.io.model import GraphIndex, opset_version, run_checker
from qtool.quantization.plan import QuantPlan

HARD_SWISH_OPSET = 14


def _scalar(index: GraphIndex, name: str) -> float | None:
    tensor = index.initializers.get(name)
    if tensor is None or int(np.prod(tensor.dims)) != 1:
        return None
    return float(tensor_array(tensor).reshape(()))


def _sole_reader(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    readers = index.consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 and tensor not in index.graph_outputs else None


def _patterns(index: GraphIndex, floats: set[str]) -> list[tuple[str, onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(x, Add, Clip, Mul) of every x * clip(x + 3, 0, 6) whose three nodes are float."""
    found = []
    for mul in index.graph.node:
        if mul.op_type != "Mul" or mul.name not in floats or len(mul.input) != 2:
            continue
        for x, other in (mul.input, mul.input[::-1]):
            clip = index.producer.get(other)
            if clip is None or clip.op_type != "Clip" or clip.name not in floats or _sole_reader(index, other) is not mul:
                continue
            add = index.producer.get(clip.input[0])
            if (add is None or add.op_type != "Add" or add.name not in floats or len(clip.input) < 3
                    or _sole_reader(index, clip.input[0]) is not clip
                    or (_scalar(index, clip.input[1]), _scalar(index, clip.input[2])) != (0.0, 6.0)):
                continue
            operands = list(add.input)
            if x in operands and _scalar(index, operands[1 - operands.index(x)]) == 3.0:
                found.append((x, add, clip, mul))
                break
    return found


def _fold_six(index: GraphIndex, floats: set[str], tensor: str, hard_swish: str) -> list[onnx.NodeProto]:
    """Carry the factor 6 of `tensor` = 6 * `hard_swish` into a float Conv that reads it alone, through a scalar
    Add (its constant divided by 6); the nodes to add where that is not possible (a Mul writing `tensor`)."""
    reader = _sole_reader(index, tensor)
    add = None
    if reader is not None and reader.op_type == "Add" and reader.name in floats:
        constant = next((name for name in reader.input if name != tensor), "")
        if _scalar(index, constant) is not None and list(reader.input).count(tensor) == 1:
            add, reader = reader, _sole_reader(index, reader.output[0])
    weight = index.initializers.get(reader.input[1]) if reader is not None and len(reader.input) > 1 else None
    if (reader is None or reader.op_type != "Conv" or reader.name not in floats or weight is None
            or weight.data_type != onnx.TensorProto.FLOAT or len(index.consumers.get(weight.name, [])) != 1):
        six = index.unique_name(f"{tensor}.hard_swish_scale")
        index.graph.initializer.append(numpy_helper.from_array(np.array(6.0, np.float32), six))
        return [helper.make_node("Mul", [hard_swish, six], [tensor], name=index.unique_name(f"{tensor}.times_6"))]
    weight.CopyFrom(numpy_helper.from_array((tensor_array(weight) * np.float32(6)).astype(np.float32), weight.name))
    if add is None:
        reader.input[0] = hard_swish
        return []
    slot = 1 - list(add.input).index(tensor)
    shifted = index.unique_name(f"{add.input[slot]}.over_6")
    index.graph.initializer.append(numpy_helper.from_array(
        np.array(_scalar(index, add.input[slot]) / 6, np.float32), shifted))
    add.input[slot], add.input[1 - slot] = shifted, hard_swish
    return []


def fuse_hard_swish(quantized: ModelProto, plan: QuantPlan) -> tuple[ModelProto, int]:
    """`quantized` with every float written-out hard-swish run as HardSwish, and how many; unchanged (0)
    when there is none or the model's opset cannot be raised to 14 (HardSwish's first)."""
    floats = {d.node for d in plan.nodes if not d.quantized}
    if not _patterns(GraphIndex(quantized.graph), floats):
        return quantized, 0
    model = quantized
    if opset_version(model) < HARD_SWISH_OPSET:
        try:
            model = version_converter.convert_version(quantized, HARD_SWISH_OPSET)
        except Exception:  # the converter raises bare RuntimeErrors per op: keep the written-out form
            return quantized, 0
    else:
        model = ModelProto()
        model.CopyFrom(quantized)
    index = GraphIndex(model.graph)
    patterns = _patterns(index, floats)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for x, add, clip, mul in patterns:
        hard_swish = index.unique_name(f"{mul.output[0]}.hard_swish")
        node = helper.make_node("HardSwish", [x], [hard_swish], name=index.unique_name(f"{mul.name}.hard_swish"))
        replaced[id(mul)] = [node, *_fold_six(index, floats, mul.output[0], hard_swish)]
        dropped |= {id(add), id(clip)}
    nodes = [new for node in model.graph.node if id(node) not in dropped
             for new in replaced.get(id(node), [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    run_checker(model)
    return model, len(patterns)
