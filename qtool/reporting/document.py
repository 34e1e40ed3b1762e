"""The report: one plain dict (versioned, qtool/reporting/schemas/report.schema.json), and its JSON.

The Markdown and JUnit renderings live in qtool.reporting.markdown, the HTML in qtool.reporting.html.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections import Counter
from pathlib import Path

import numpy
import onnx
import onnxruntime

from qtool import __version__
from qtool.calibration.calibrate import CalibrationTable
from qtool.evaluation.compare import Comparison, GateResult
from qtool.io.data import DataFolder
from qtool.io.model import file_sha256
from qtool.quantization.plan import QuantPlan
from qtool.recipe.schema import Recipe
from qtool.runtime.session import current_providers

REPORT_SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    return {
        "qtool": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def execution_providers() -> list[dict]:
    """The ONNX Runtime providers every session of this run was given, in order of preference."""
    return [{"name": name, "options": dict(options)} for name, options in current_providers()]


def _recipe_provenance(recipe: Recipe) -> dict:
    source = recipe.source
    return {
        "path": str(source) if source else None,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest() if source else None,
        "resolved": recipe.as_dict(),
    }


def _comparison_section(comparison: Comparison) -> dict:
    section = {"samples": comparison.samples, "outputs": comparison.outputs}
    if comparison.accuracy:
        section["accuracy"] = {
            "float": comparison.accuracy["reference"],
            "quantized": comparison.accuracy["candidate"],
            "drop": comparison.accuracy["reference"] - comparison.accuracy["candidate"],
            "labelled_samples": comparison.labelled,
        }
    return section


def gate_verdict(gate: dict, failed: str = "FAIL") -> str:
    """A report gate row's verdict in words: pass, `failed`, or not applicable with its reason."""
    if gate["passed"] is None:
        return f"not applicable ({gate.get('not_applicable', '')})"
    return "pass" if gate["passed"] else failed


def gates_section(gates: list[GateResult]) -> list[dict]:
    """The report's gate rows: `passed` null, and `not_applicable` the reason, for a gate that checked
    nothing on this model (it neither passed nor failed)."""
    return [{"name": g.name, "threshold": g.threshold, "value": g.value, "passed": g.verdict,
             **({"not_applicable": g.not_applicable} if g.not_applicable else {})} for g in gates]


def _size_section(float_bytes: int, quantized_bytes: int) -> dict:
    return {"float_bytes": float_bytes, "quantized_bytes": quantized_bytes,
            "ratio": float_bytes / quantized_bytes if quantized_bytes else None}


def build_compare_report(
    *, reference_path: Path, candidate_path: Path, recipe: Recipe | None, data: DataFolder,
    labels_path: Path | None, reference_bytes: int, candidate_bytes: int, comparison: Comparison,
    gates: list[GateResult], layers: dict | None = None, latency: dict | None = None,
    warnings: list[str] | None = None,
) -> dict:
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": "compare",
        "passed": all(gate.passed for gate in gates),
        "versions": versions(),
        "execution_providers": execution_providers(),
        "inputs": {
            "reference": {"path": str(reference_path), "sha256": file_sha256(reference_path)},
            "candidate": {"path": str(candidate_path), "sha256": file_sha256(candidate_path)},
            "recipe": _recipe_provenance(recipe) if recipe is not None else None,
            "validation_data": {"path": str(data.folder), "listing_sha256": data.listing_hash()},
            "labels": str(labels_path) if labels_path else None,
        },
        "size": _size_section(reference_bytes, candidate_bytes),
        "validation": _comparison_section(comparison),
        "gates": gates_section(gates),
        "warnings": with_data_notes(warnings or [], data),
    }
    if layers is not None:
        report["layers"] = layers
    if latency is not None:
        report["latency"] = latency
    return report


def with_data_notes(warnings: list[str], *sources: DataFolder | None) -> list[str]:
    """The warnings, then what reading the data did that its files do not show (files resampled or not
    read), each note once (calibration and validation data are often the same folder)."""
    notes = [note for source in sources if source is not None for note in source.notes]
    return [*warnings, *(note for note in dict.fromkeys(notes) if note not in warnings)]


def _plan_section(plan: QuantPlan) -> dict:
    quantized = Counter(d.op_type for d in plan.nodes if d.quantized)
    float_reasons = Counter(f"{d.op_type}: {d.reason}" for d in plan.nodes if not d.quantized)
    return {
        "nodes_quantized": sum(quantized.values()),
        "nodes_float": len(plan.nodes) - sum(quantized.values()),
        "quantized_by_op": dict(sorted(quantized.items())),
        "float_by_reason": dict(sorted(float_reasons.items())),
        "activations": len(plan.activations),
        "weights": sum(1 for c in plan.constants.values() if c.role == "weight"),
        "biases": len(plan.biases),
        "weights_reduce_range": plan.reduce_range,
        "weight_only_matmulnbits": len(plan.nbits),
        "notes": plan.notes,
        "nodes": [
            {"node": d.node, "op_type": d.op_type, "quantized": d.quantized, "reason": d.reason,
             "tensors": dict(d.tensors)}
            for d in plan.nodes
        ],
    }


def _calibration_data(calib_data: DataFolder | None, table: CalibrationTable) -> dict:
    """The data the ranges were measured on: read now, or recorded in a calibration table."""
    if calib_data is not None:
        return {"path": str(calib_data.folder), "listing_sha256": calib_data.listing_hash()}
    recorded = table.provenance.get("data") or {}
    return {"path": recorded.get("path"), "listing_sha256": recorded.get("listing_sha256")}


def _calibration_section(recipe: Recipe, table: CalibrationTable) -> dict:
    if not table.ranges and not table.provenance.get("file") and recipe.quantization.mode == "dynamic":
        return {"method": "none", "samples": 0, "tensors": 0,
                "why": "quantization.mode dynamic: activations are quantized at run time, nothing was calibrated"}
    section = {"method": recipe.calibration.method, "samples": table.samples, "tensors": len(table.ranges)}
    if table.batching:  # per input its batch axis and why; how many samples a run held
        section["batching"] = table.batching
    if table.method_choice:  # calibration.method auto: each tensor's chosen range, and the choice in one line
        section.update(method_choice=table.method_choice, note=table.notes[-1])
    if table.provenance.get("file"):  # ranges read from `--calibration TABLE.json`
        made_with = ((table.provenance.get("recipe") or {}).get("resolved") or {}).get("calibration") or {}
        section.update(method=made_with.get("method", section["method"]), table=table.provenance["file"])
    return section


def build_quantize_report(
    *, model_path: Path, model_sha256: str, recipe: Recipe, calib_data: DataFolder | None,
    eval_data: DataFolder, prepare_notes: list[str], table: CalibrationTable, plan: QuantPlan,
    saturating_host: bool, float_bytes: int, quantized_bytes: int, integer_ops: dict,
    optimized_ops: dict, comparison: Comparison, simulated: Comparison,
    gates: list[GateResult], warnings: list[str], layers: dict | None = None, latency: dict | None = None,
    algorithms: dict | None = None,
) -> dict:
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": "quantize",
        "passed": all(gate.passed for gate in gates),
        "versions": versions(),
        "execution_providers": execution_providers(),
        "inputs": {
            "model": {"path": str(model_path), "sha256": model_sha256},
            "recipe": _recipe_provenance(recipe),
            "calibration_data": _calibration_data(calib_data, table),
            "validation_data": {"path": str(eval_data.folder), "listing_sha256": eval_data.listing_hash()},
        },
        "host": {
            "machine": platform.machine(),
            "int8_kernels_may_saturate": saturating_host,
            "weights_reduce_range": plan.reduce_range,
            "reduce_range_setting": recipe.quantization.weights.reduce_range,
        },
        "prepare": prepare_notes,
        "calibration": _calibration_section(recipe, table),
        "plan": _plan_section(plan),
        "size": _size_section(float_bytes, quantized_bytes),
        "kernels": {"integer_ops": integer_ops, "optimized_ops": optimized_ops},
        "validation": _comparison_section(comparison),
        "simulated": _comparison_section(simulated),
        "gates": gates_section(gates),
        "warnings": with_data_notes(warnings, calib_data, eval_data),
    }
    if layers is not None:
        report["layers"] = layers
    if latency is not None:
        report["latency"] = latency
    if algorithms is not None:
        report["algorithms"] = algorithms
    return report


def _json_safe(value):
    """JSON has no inf/nan: write them as strings so every parser reads the report."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def render_json(report: dict) -> str:
    return json.dumps(_json_safe(report), indent=2, sort_keys=False) + "\n"
