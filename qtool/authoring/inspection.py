"""Facts about a model file, for `qtool inspect`: what it is and what qtool would do to it.

Problems qtool would refuse or change later are collected here as data,
never raised: inspecting a model that cannot be quantized still answers.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from qtool.authoring.conventions import find_convention
from qtool.errors import ModelError
from qtool.io.batching import BatchAxis, InputSpec, batch_axes
from qtool.io.model import MIN_OPSET, check_external_data, external_data_files, opset_version, refuse_quantized
from qtool.quantization.plan import NodeDecision


@dataclass(frozen=True)
class TensorFacts:
    """A graph input or output; dims are ints, symbolic names, or None (unknown)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None  # None: rank unknown
    batch: BatchAxis | None = None  # inputs only: the axis samples are stacked along, and why

    def describe(self) -> str:
        if self.shape is None:
            text = f"{self.name}: {self.dtype} [rank unknown]"
        else:
            dims = ", ".join("?" if dim is None else str(dim) for dim in self.shape)
            text = f"{self.name}: {self.dtype} [{dims}]"
        if self.batch is not None:
            where = "no batch axis" if self.batch.axis is None else f"batch axis {self.batch.axis}"
            text += f"; {where} ({self.batch.reason})"
        return text


@dataclass(frozen=True)
class Problem:
    """Something qtool would `refuse` (exit 2) or `change` (e.g. an opset upgrade) later."""

    action: Literal["refuse", "change"]
    message: str


@dataclass(frozen=True)
class ExternalFile:
    location: str
    bytes: int | None  # None: not read (see status and problems)
    status: Literal["present", "missing", "outside", "invalid"] = "present"  # outside the model's folder and
    # invalid (a NUL byte in the name) are refused by the loader

    def describe(self) -> str:
        """`w.bin (1,024 B)`, `w.bin (missing)`, `../w.bin (outside the model's folder: refused)`."""
        said = {"missing": "missing", "outside": "outside the model's folder: refused",
                "invalid": "not a plain file name: refused"}
        return f"{self.location} ({said[self.status] if self.status in said else f'{self.bytes:,} B'})"


@dataclass(frozen=True)
class Inspection:
    path: Path
    file_bytes: int
    ir_version: int
    opset: int
    opset_imports: dict[str, int]
    producer: str
    family: str | None  # a model family with published preprocessing (authoring/conventions.py), when recognised
    inputs: list[TensorFacts]
    outputs: list[TensorFacts]
    op_types: dict[str, int]
    nodes: int
    initializers: int
    metadata_keys: list[str]
    external_data: list[ExternalFile]
    problems: list[Problem]
    # What qtool would do, on the prepared model; None when loading or upgrading is refused.
    prepare_notes: list[str] = field(default_factory=list)
    recipe: str = "built-in default"
    decisions: list[NodeDecision] | None = None

    @property
    def external_bytes(self) -> int:
        return sum(item.bytes or 0 for item in self.external_data)

    @property
    def quantizable(self) -> bool:
        return not any(problem.action == "refuse" for problem in self.problems)

    def quantized_op_types(self) -> dict[str, int]:
        counts = Counter(d.op_type for d in self.decisions or [] if d.quantized)
        return dict(sorted(counts.items()))

    def float_reasons(self) -> dict[str, dict[str, int]]:
        """reason → {op type: nodes} for the nodes that stay float."""
        reasons: dict[str, Counter] = {}
        for decision in self.decisions or []:
            if not decision.quantized:
                reasons.setdefault(decision.reason, Counter())[decision.op_type] += 1
        return {reason: dict(sorted(counts.items())) for reason, counts in sorted(reasons.items())}

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (`qtool inspect --json`)."""
        quantization = None
        if self.decisions is not None:
            quantization = {
                "recipe": self.recipe,
                "nodes_quantized": sum(d.quantized for d in self.decisions),
                "nodes_float": sum(not d.quantized for d in self.decisions),
                "quantized_op_types": self.quantized_op_types(),
                "float_reasons": self.float_reasons(),
                "nodes": [{"node": d.node, "op_type": d.op_type, "quantized": d.quantized, "reason": d.reason}
                          for d in self.decisions],
            }
        return {
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "ir_version": self.ir_version,
            "opset": self.opset,
            "opset_imports": self.opset_imports,
            "producer": self.producer,
            "family": self.family,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "nodes": self.nodes,
            "initializers": self.initializers,
            "op_types": self.op_types,
            "metadata_keys": self.metadata_keys,
            "external_data": {"files": [{"location": f.location, "bytes": f.bytes, "status": f.status}
                                        for f in self.external_data],
                              "total_bytes": self.external_bytes},
            "problems": [{"action": p.action, "message": p.message} for p in self.problems],
            "quantizable": self.quantizable,
            "prepare": self.prepare_notes,
            "quantization": quantization,
        }


def _tensor_dict(tensor: TensorFacts) -> dict[str, Any]:
    facts = {"name": tensor.name, "dtype": tensor.dtype,
             "shape": None if tensor.shape is None else list(tensor.shape)}
    if tensor.batch is not None:
        facts["batch_axis"] = tensor.batch.as_dict()
    return facts


def _with_batch_axes(inputs: list[TensorFacts]) -> list[TensorFacts]:
    axes = batch_axes([InputSpec(t.name, None, t.shape) for t in inputs])
    return [replace(t, batch=axes[t.name]) for t in inputs]


def load_problems(model: ModelProto, path: Path) -> list[Problem]:
    """What `load_model` would refuse: unsafe or missing external data, an already-quantized model."""
    problems = []
    for check in (check_external_data, refuse_quantized):
        try:
            check(model, path)
        except ModelError as exc:
            problems.append(Problem("refuse", str(exc)))
    return problems


def opset_problem(current: int, upgraded: bool | None) -> Problem | None:
    """An opset below 13: `upgraded` says whether the upgrade worked (None: not tried)."""
    if current >= MIN_OPSET or upgraded is False:  # a failed upgrade is reported by its own error
        return None
    will = "qtool upgrades it" if upgraded else "qtool would try to upgrade it"
    return Problem("change", f"opset {current} is below {MIN_OPSET} (per-channel QuantizeLinear/"
                             f"DequantizeLinear needs `axis`): {will} to {MIN_OPSET}")


def _dtype_name(elem_type: int) -> str:
    """numpy's spelling (float32, int64, ...) where there is one, else ONNX's (bfloat16, ...)."""
    if not elem_type:
        return "unknown"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower()


def tensor_facts(value: onnx.ValueInfoProto) -> TensorFacts:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorFacts(value.name, kind or "unknown", None)
    tensor = value.type.tensor_type
    dtype = _dtype_name(tensor.elem_type)
    if not tensor.HasField("shape"):
        return TensorFacts(value.name, dtype, None)
    dims = tuple(
        (d.dim_value if d.dim_value > 0 else None) if d.HasField("dim_value") else (d.dim_param or None)
        for d in tensor.shape.dim
    )
    return TensorFacts(value.name, dtype, dims)


def external_files(model: ModelProto, path: Path) -> list[ExternalFile]:
    folder = path.parent.resolve()
    files = []
    for location in external_data_files(model):
        if "\0" in location:  # refused by load_problems; no size to show
            files.append(ExternalFile(location, None, "invalid"))
            continue
        target = (folder / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(folder):
            files.append(ExternalFile(location, None, "outside"))  # as check_external_data refuses it
        elif target.is_file():
            files.append(ExternalFile(location, target.stat().st_size))
        else:
            files.append(ExternalFile(location, None, "missing"))
    return files


def _family(model: ModelProto) -> str | None:
    convention = find_convention(model)
    return f"{convention.family} ({convention.source})" if convention else None


def describe_model(model: ModelProto, path: Path, problems: list[Problem], *, prepare_notes: list[str] = (),
                   recipe: str = "built-in default", decisions: list[NodeDecision] | None = None) -> Inspection:
    """Collect the facts of `model` (as read from `path`, without external data)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    return Inspection(
        path=path,
        file_bytes=path.stat().st_size,
        ir_version=model.ir_version,
        opset=opset_version(model),
        opset_imports={entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        producer=" ".join(filter(None, (model.producer_name, model.producer_version))),
        family=_family(model),
        inputs=_with_batch_axes([tensor_facts(v) for v in graph.input if v.name not in initializers]),
        outputs=[tensor_facts(v) for v in graph.output],
        op_types=dict(sorted(Counter(node.op_type for node in graph.node).items())),
        nodes=len(graph.node),
        initializers=len(graph.initializer),
        metadata_keys=[entry.key for entry in model.metadata_props],
        external_data=external_files(model, path),
        problems=list(problems),
        prepare_notes=list(prepare_notes),
        recipe=recipe,
        decisions=decisions,
    )
