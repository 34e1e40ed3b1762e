"""The report: one plain dict (versioned), rendered as JSON and Markdown.

Every string that comes from a model is escaped before it reaches Markdown.
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
from qtool.calibrate import CalibrationTable
from qtool.compare import Comparison, GateResult
from qtool.data import DataFolder
from qtool.plan import QuantPlan
from qtool.recipe import Recipe

REPORT_SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    return {
        "qtool": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


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
        "notes": plan.notes,
        "nodes": [
            {"node": d.node, "op_type": d.op_type, "quantized": d.quantized, "reason": d.reason}
            for d in plan.nodes
        ],
    }


def build_quantize_report(
    *, model_path: Path, model_sha256: str, recipe: Recipe, calib_data: DataFolder,
    eval_data: DataFolder, prepare_notes: list[str], table: CalibrationTable, plan: QuantPlan,
    saturating_host: bool, float_bytes: int, quantized_bytes: int, integer_ops: dict,
    optimized_ops: dict, comparison: Comparison, simulated: Comparison,
    gates: list[GateResult], warnings: list[str],
) -> dict:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": "quantize",
        "passed": all(gate.passed for gate in gates),
        "versions": versions(),
        "inputs": {
            "model": {"path": str(model_path), "sha256": model_sha256},
            "recipe": _recipe_provenance(recipe),
            "calibration_data": {"path": str(calib_data.folder), "listing_sha256": calib_data.listing_hash()},
            "validation_data": {"path": str(eval_data.folder), "listing_sha256": eval_data.listing_hash()},
        },
        "host": {
            "machine": platform.machine(),
            "int8_kernels_may_saturate": saturating_host,
            "weights_reduce_range": plan.reduce_range,
            "reduce_range_setting": recipe.quantization.weights.reduce_range,
        },
        "prepare": prepare_notes,
        "calibration": {"method": recipe.calibration.method, "samples": table.samples,
                        "tensors": len(table.ranges)},
        "plan": _plan_section(plan),
        "size": {
            "float_bytes": float_bytes,
            "quantized_bytes": quantized_bytes,
            "ratio": float_bytes / quantized_bytes if quantized_bytes else None,
        },
        "kernels": {"integer_ops": integer_ops, "optimized_ops": optimized_ops},
        "validation": _comparison_section(comparison),
        "simulated": _comparison_section(simulated),
        "gates": [
            {"name": g.name, "threshold": g.threshold, "value": g.value, "passed": g.passed} for g in gates
        ],
        "warnings": warnings,
    }


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


def md_escape(text: str) -> str:
    """Make a model-supplied string inert in Markdown (and in HTML inside Markdown)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_{}[]()#+-!|~":
        text = text.replace(char, "\\" + char)
    return text


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def render_markdown(report: dict) -> str:
    val, size = report["validation"], report["size"]
    verdict = "passed" if report["passed"] else "**FAILED**"
    lines = [
        f"# qtool {report['command']} report — {verdict}",
        "",
        f"Model {md_escape(Path(report['inputs']['model']['path']).name)}: "
        f"{size['float_bytes']:,} → {size['quantized_bytes']:,} bytes "
        f"({_fmt(size['ratio'])}× smaller); {report['plan']['nodes_quantized']} nodes quantized, "
        f"{report['plan']['nodes_float']} float.",
        "",
    ]
    if report["gates"]:
        lines += ["## Gates", "", "| gate | threshold | value | verdict |", "|---|---|---|---|"]
        lines += [f"| {g['name']} | {_fmt(g['threshold'])} | {_fmt(g['value'])} | "
                  f"{'pass' if g['passed'] else '**FAIL**'} |" for g in report["gates"]]
        lines.append("")
    lines += [f"## Outputs ({val['samples']} samples)", "",
              "| output | cosine | SQNR dB | max abs err | top-1 agreement |", "|---|---|---|---|---|"]
    for name, figures in val["outputs"].items():
        lines.append(f"| {md_escape(name)} | {_fmt(figures['cosine'])} | {_fmt(figures['sqnr_db'])} | "
                     f"{_fmt(figures['max_abs_error'])} | {_fmt(figures.get('top1_agreement'))} |")
    if "accuracy" in val:
        acc = val["accuracy"]
        lines += ["", f"Top-1 accuracy on {acc['labelled_samples']} labelled samples: "
                      f"float {acc['float']:.2%}, quantized {acc['quantized']:.2%} "
                      f"(drop {acc['drop'] * 100:.2f} points)."]
    ops = report["kernels"]["integer_ops"]
    lines += ["", "## Kernels", "",
              "Integer ops after ONNX Runtime's optimizer: "
              + (", ".join(f"{op} ×{n}" for op, n in ops.items()) or "none") + ".",
              f"Weights stored in {'7' if report['host']['weights_reduce_range'] else '8'} bits "
              f"(reduce_range: {report['host']['reduce_range_setting']}; int8 kernels may saturate on this "
              f"host: {'yes' if report['host']['int8_kernels_may_saturate'] else 'no'})."]
    notes = report["prepare"] + report["plan"]["notes"]
    if notes or report["warnings"]:
        lines += ["", "## Notes", ""]
        lines += [f"- warning: {md_escape(w)}" for w in report["warnings"]]
        lines += [f"- {md_escape(n)}" for n in notes]
    versions_line = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", f"<sub>{versions_line}; model sha256 {report['inputs']['model']['sha256'][:16]}…</sub>", ""]
    return "\n".join(lines)
