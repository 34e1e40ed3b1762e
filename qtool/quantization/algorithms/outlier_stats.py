"""The measuring passes of outlier handling: per-tensor statistics streamed from the float model over the
calibration data, as scalar and [channels] graph outputs (memory: one run's activations, never more)."""

from __future__ import annotations

import math

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from qtool.io.model import GraphIndex, opset_version
from qtool.io.samples import DataSource
from qtool.quantization.algorithms.streaming import measured
from qtool.runtime.session import make_session

TINY = 1e-30  # |x| below this counts as zero (exactly representable: no rounding error)
COMBINE = {"peak": np.maximum, "lo": np.minimum, "hi": np.maximum}  # the rest add up


class RunFailed(Exception):
    """ONNX Runtime failed on the calibration data (bad data, e.g. an index out of range): the
    calibration pass that follows names the file."""


class _Measuring:
    """A copy of the model with reductions added as extra outputs; `run` streams the data through it."""

    def __init__(self, model: ModelProto):
        self.source = model
        self.model = ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.index = GraphIndex(self.graph)
        self.new_axes = opset_version(self.model) >= 18  # the Reduce ops' axes became an input
        self.outputs: dict[str, dict[str, str]] = {}

    def constant(self, base: str, value, dtype) -> str:
        name = self.index.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, axes: list[int] | None = None, **attrs) -> str:
        out = self.index.unique_name(base)
        if axes is not None and self.new_axes:
            inputs = [*inputs, self.constant(f"{out}.axes", axes, np.int64)]
        elif axes is not None:
            attrs["axes"] = axes
        self.graph.node.append(helper.make_node(op, inputs, [out], name=self.index.unique_name(f"{out}_{op}"),
                                                **attrs))
        return out

    def total(self, tensor: str, base: str) -> str:
        return self.node("ReduceSum", [tensor], base, keepdims=0)

    def nonzero(self, absolute: str, base: str) -> str:
        """1.0 where |x| > TINY, else 0.0."""
        above = self.node("Greater", [absolute, self.constant(f"{base}.tiny", TINY, np.float32)], f"{base}.nonzero")
        return self.node("Cast", [above], f"{base}.ones", to=TensorProto.FLOAT)

    def expose(self, key: str, outputs: dict[str, str]) -> None:
        self.outputs[key] = outputs
        self.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs.values())

    def run(self, data: DataSource, batch_size: int) -> dict[str, dict[str, np.ndarray]]:
        session = make_session(self.model, optimize=False)
        found: dict[str, dict[str, np.ndarray]] = {}
        runs = measured(session, self.source, data, batch_size)
        while True:
            try:
                _, results = next(runs)
            except StopIteration:
                break
            except Exception as exc:
                if type(exc).__module__.startswith("onnxruntime"):
                    raise RunFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
                raise
            for key, names in self.outputs.items():
                values = {part: np.asarray(results[name], np.float64) for part, name in names.items()}
                before = found.get(key)
                found[key] = values if before is None else {
                    part: COMBINE.get(part, np.add)(before[part], value) for part, value in values.items()}
        return found


def statistics(model: ModelProto, tensors: dict[str, tuple[int, int]], powers: set[str], relative: set[str],
               data: DataSource, batch_size: int) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """One float pass. Per tensor (name -> (channels, axis: -1 last, 1 NCHW)): `lo`, `hi`, `count` and per
    channel `peak` (max |x|) and `square` (sum of x^2). Per tensor in `powers`: its mean square, or for
    those also in `relative` the square of the geometric mean of its nonzero |x| where that is smaller."""
    measuring = _Measuring(model)
    node = measuring.node
    for tensor, (channels, axis) in tensors.items():
        base = f"{tensor}.outliers"
        view = tensor
        if axis == 1:  # [N, C, ...] -> [N, rest, C]
            view = node("Reshape", [tensor, measuring.constant(f"{base}.ncr", [0, channels, -1], np.int64)],
                        f"{base}.ncr")
            view = node("Transpose", [view], f"{base}.nrc", perm=[0, 2, 1])
        rows = node("Reshape", [view, measuring.constant(f"{base}.shape", [-1, channels], np.int64)], f"{base}.rows")
        measuring.expose(tensor, {
            "peak": node("ReduceMax", [node("Abs", [rows], f"{base}.abs")], f"{base}.peak", [0], keepdims=0),
            "square": node("ReduceSumSquare", [rows], f"{base}.square", [0], keepdims=0),
            "lo": node("ReduceMin", [rows], f"{base}.lo", keepdims=0),
            "hi": node("ReduceMax", [rows], f"{base}.hi", keepdims=0),
            "count": node("Size", [rows], f"{base}.count"),
        })
    for tensor in sorted(powers):
        base = f"{tensor}.outliers.power"
        parts = {"square": node("ReduceSumSquare", [tensor], f"{base}.square", keepdims=0),
                 "count": node("Size", [tensor], f"{base}.count")}
        if tensor in relative:
            absolute = node("Abs", [tensor], f"{base}.abs")
            ones = measuring.nonzero(absolute, base)
            lifted = node("Max", [absolute, measuring.constant(f"{base}.lift", TINY, np.float32)], f"{base}.lifted")
            parts["log"] = measuring.total(node("Mul", [node("Log", [lifted], f"{base}.logabs"), ones], f"{base}.logs"),
                                           f"{base}.log")
            parts["nonzero"] = measuring.total(ones, f"{base}.nonzeros")
        measuring.expose(f"power:{tensor}", parts)
    found = measuring.run(data, batch_size)
    if not found:  # no sample: nothing measured (calibration, next, says so)
        return {}, {}
    mean_squares: dict[str, float] = {}
    for tensor in powers:
        part = found.pop(f"power:{tensor}")
        mean = float(part["square"]) / max(float(part["count"]), 1.0)
        if "log" in part:
            count = float(part["nonzero"])
            mean = min(mean, math.exp(2 * float(part["log"]) / count) if count > 0 else 0.0)
        mean_squares[tensor] = mean
    return found, mean_squares


def relative_noise(model: ModelProto, steps: dict[str, float], data: DataSource, batch_size: int) -> dict[str, float]:
    """A second float pass: per tensor (name -> its quantization step Δ), the mean over its nonzero
    elements of min(Δ^2 / (12 x^2), 1), the power of the relative error rounding leaves (an element that
    rounds to nothing loses all of itself, no more). For readers that take roots, reciprocals or logs."""
    measuring = _Measuring(model)
    node = measuring.node
    for tensor, step in sorted(steps.items()):
        base = f"{tensor}.outliers.relative"
        ones = measuring.nonzero(node("Abs", [tensor], f"{base}.abs"), base)
        square = node("Max", [node("Mul", [tensor, tensor], f"{base}.sq"),
                              measuring.constant(f"{base}.lift", TINY, np.float32)], f"{base}.lifted")
        ratio = node("Div", [measuring.constant(f"{base}.noise", step * step / 12, np.float32), square], f"{base}.ratio")
        capped = node("Min", [ratio, measuring.constant(f"{base}.one", 1.0, np.float32)], f"{base}.capped")
        measuring.expose(tensor, {"sum": measuring.total(node("Mul", [capped, ones], f"{base}.kept"), f"{base}.sum"),
                                  "nonzero": measuring.total(ones, f"{base}.nonzeros")})
    found = measuring.run(data, batch_size)
    return {tensor: float(part["sum"]) / float(part["nonzero"]) if float(part["nonzero"]) > 0 else 0.0
            for tensor, part in found.items()}
