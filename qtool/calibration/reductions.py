"""minmax calibration measured inside the graph: each tensor's min, max, sum and shape as tiny extra outputs.

A minmax observer needs only a run's min and max of each tensor, so instead of exposing the whole
activation (which ONNX Runtime then holds until the run ends and copies out), the calibration model
computes them itself, as onnxruntime.quantization's MinMax calibrator does: ReduceMin, ReduceMax
(over every axis, keepdims 0: no `axes`, so any opset), plus ReduceSum (non-finite iff a value is
nan or inf, or the sum overflows) and Shape (the size and the samples the observer counts). A run
whose sum is not finite is run again with that tensor exposed, and the observer reads it whole
(nan and inf never widen a range, and ORT's ReduceMin/Max need not propagate nan as numpy does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from onnx import ModelProto, TensorProto, helper

from qtool.calibration.observers import MinMaxObserver
from qtool.io.model import GraphIndex
from qtool.runtime.session import make_session, run, with_outputs

# Methods whose observer reads only a run's min and max: these are measured in the graph.
IN_GRAPH_METHODS = {"minmax"}
PARTS = (("lo", "ReduceMin"), ("hi", "ReduceMax"), ("total", "ReduceSum"), ("shape", "Shape"))

Execute = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def reducible(model: ModelProto, tensors: list[str], methods: dict[str, str], exposed: set[str]) -> list[str]:
    """The tensors minmax observes and nothing else reads whole (not in `exposed`, e.g. gptq's Hessian
    inputs), whose type is float32 (or not declared: exposing assumes float32 too)."""
    declared = {value.name: value.type.tensor_type.elem_type
                for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]
                if value.type.HasField("tensor_type")}
    return [name for name in tensors if methods[name] in IN_GRAPH_METHODS and name not in exposed
            and declared.get(name, TensorProto.FLOAT) in (TensorProto.FLOAT, 0)]


@dataclass
class InGraphMinMax:
    """The reductions of `tensors` added to a model, and how to read a run's outputs of them.

    `outputs`: tensor -> {part: graph output name} for the parts of PARTS. Names come from the graph's
    unique_name, so they never collide with the model's own.
    """

    tensors: list[str]
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)

    def add_to(self, model: ModelProto) -> ModelProto:
        """`model` (a copy of the caller's: changed in place, not copied again, which past 2 GB counts)
        made to return every tensor's parts too (a scalar each, and a shape); returned."""
        graph, index = model.graph, GraphIndex(model.graph)
        after: dict[str, list] = {}  # producer's output -> the nodes reading it, placed right after the producer
        for tensor in self.tensors:
            names = {}
            for part, op in PARTS:
                names[part] = index.unique_name(f"{tensor}.calibration_{part}")
                attrs = {} if op == "Shape" else {"keepdims": 0}
                after.setdefault(tensor, []).append(
                    helper.make_node(op, [tensor], [names[part]], index.unique_name(f"{names[part]}_{op}"), **attrs))
                graph.output.append(helper.make_empty_tensor_value_info(names[part]))
            self.outputs[tensor] = names
        # A session made with in_order runs nodes about in the order listed: appended at the end, every
        # tensor would stay alive until then (all of them at once: more memory than exposing them)
        nodes = [node for name in [value.name for value in graph.input] for node in after.pop(name, [])]
        for node in graph.node:
            nodes += [node, *(added for name in node.output for added in after.pop(name, []))]
        nodes += [added for rest in after.values() for added in rest]  # initializers, or names no node makes
        del graph.node[:]
        graph.node.extend(nodes)
        return model

    def checked(self, model: ModelProto, execute: Execute) -> Execute:
        """`execute` (a run of the model `add_to` made), followed, where a tensor's sum is not finite,
        by a run of `model` on the same feeds exposing the tensors found so: their arrays join the outputs."""

        rerun: dict = {}  # the session exposing every tensor found non-finite so far, by their names

        def execute_checked(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = execute(feeds)
            bad = [tensor for tensor in self.tensors if not math.isfinite(float(outputs[self.outputs[tensor]["total"]]))]
            if not bad:
                return outputs
            names = tuple(sorted({*bad, *next(iter(rerun), ())}))
            if names not in rerun:
                rerun.clear()
                rerun[names] = make_session(with_outputs(model, names), optimize=False)
            whole = run(rerun[names], feeds)
            return {**outputs, **{tensor: whole[tensor] for tensor in bad}}

        return execute_checked

    def nbytes(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Bytes each tensor had on this run (what exposing it would have cost)."""
        return {tensor: float(math.prod(int(d) for d in outputs[names["shape"]]) * outputs[names["lo"]].dtype.itemsize)
                for tensor, names in self.outputs.items()}

    def observe(self, observers: dict[str, MinMaxObserver], outputs: dict[str, np.ndarray]) -> None:
        """Update each tensor's observer from its parts; from the whole array where a rerun exposed it."""
        for tensor, names in self.outputs.items():
            if tensor in outputs:
                observers[tensor].update(outputs[tensor])
                continue
            shape = [int(d) for d in outputs[names["shape"]]]
            observers[tensor].update_range(float(outputs[names["lo"]]), float(outputs[names["hi"]]),
                                           math.prod(shape), shape[0] if shape else 1)
