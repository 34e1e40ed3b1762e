"""The report: one plain dict (versioned, qtool/reporting/schemas/report.schema.json), rendered as JSON, Markdown and JUnit.

Every string that comes from a model is escaped before it reaches Markdown or XML.
The HTML rendering lives in qtool.reporting.html.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import xml.etree.ElementTree as ET
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
from qtool.reporting.algorithms import algorithms_markdown
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


def md_escape(text: str) -> str:
    """Make a model-supplied string inert in Markdown (and in HTML inside Markdown), escaping only what
    Markdown reads inline: `(per-channel)` stays as written; `[x](y)` cannot become a link."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|~":
        text = text.replace(char, "\\" + char)
    text = text.replace("\\](", "\\]\\(")
    return "\\" + text if text[:1] in ("#", "+", "-", "!") else text  # no heading or list at a line's start


def _fmt_gate(value) -> str:
    """Gate values with the digits a threshold like 0.9999 needs."""
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else _fmt(value)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _fmt_slice(figures: dict) -> str:
    """`12.3 (axis 1, index 4 of 84)`; n/a without a feature axis."""
    worst = figures.get("worst_slice")
    if not worst:
        return "n/a"
    return f"{_fmt(worst['sqnr_db'])} (axis {worst['axis']}, index {worst['index']} of {worst['slices']})"


def _model_names(report: dict) -> tuple[str, str]:
    inputs = report["inputs"]
    if report["command"] == "compare":
        return Path(inputs["reference"]["path"]).name, Path(inputs["candidate"]["path"]).name
    return Path(inputs["model"]["path"]).name, "quantized"


def headline(report: dict) -> str:
    """One line: size, and latency when measured."""
    size = report["size"]
    parts = [f"size {size['float_bytes']:,} → {size['quantized_bytes']:,} bytes ({_fmt(size['ratio'])}× smaller)"]
    latency = report.get("latency")
    if latency:
        low, high = latency["ratio_interval"]
        parts.append(f"latency ratio {_fmt(latency['ratio'])} (95 % interval {low:.3g}–{high:.3g}"
                     f"{'' if latency['tight'] else ', noisy'}; median {latency['candidate']['median_ms']:.3g} ms "
                     f"vs {latency['reference']['median_ms']:.3g} ms)")
    return "; ".join(parts)


MD_LAYER_ROWS = 20


def render_markdown(report: dict) -> str:
    val = report["validation"]
    verdict = "passed" if report["passed"] else "**FAILED**"
    reference, candidate = _model_names(report)
    lines = [f"# qtool {report['command']} report — {verdict}", ""]
    if report["command"] == "compare":
        lines.append(f"Reference {md_escape(reference)} vs candidate {md_escape(candidate)}: {headline(report)}.")
    else:
        lines.append(f"Model {md_escape(reference)}: {headline(report)}; {report['plan']['nodes_quantized']} "
                     f"nodes quantized, {report['plan']['nodes_float']} float. {_ranges_line(report)}")
    lines.append("")
    if report["gates"]:
        lines += ["## Gates", "", "| gate | threshold | value | verdict |", "|---|---|---|---|"]
        lines += [f"| {g['name']} | {_fmt(g['threshold'])} | {_fmt_gate(g['value'])} | {gate_verdict(g, '**FAIL**')} |"
                  for g in report["gates"]]
        lines.append("")
    lines += [f"## Outputs ({val['samples']} samples)", "",
              "| output | cosine | SQNR dB | worst slice dB | MSE | max abs err | mean abs err | top-1 agreement "
              "| top-5 agreement |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, f in val["outputs"].items():
        lines.append(f"| {md_escape(name)} | {_fmt(f['cosine'])} | {_fmt(f['sqnr_db'])} | {_fmt_slice(f)} | "
                     f"{_fmt(f['mse'])} | {_fmt(f['max_abs_error'])} | {_fmt(f['mean_abs_error'])} | "
                     f"{_fmt(f.get('top1_agreement'))} | {_fmt(f.get('top5_agreement'))} |")
    for name, f in val["outputs"].items():
        if "exact_match" in f:  # integer outputs (tags, class ids): the fraction equal, not cosine or SQNR
            scope = (f"the {f['exact_match_positions']:,} positions where input {md_escape(f['exact_match_masked_by'])} "
                     "is non-zero (padding not scored)" if "exact_match_masked_by" in f else "every element")
            lines += ["", f"Exact match of integer output {md_escape(name)}: {_fmt(f['exact_match'])} over {scope}."]
    if "accuracy" in val:
        acc = val["accuracy"]
        first, second = ("reference", "candidate") if report["command"] == "compare" else ("float", "quantized")
        lines += ["", f"Top-1 accuracy on {acc['labelled_samples']} labelled samples: "
                      f"{first} {acc['float']:.2%}, {second} {acc['quantized']:.2%} "
                      f"(drop {acc['drop'] * 100:.2f} points)."]
    layers = report.get("layers")
    if layers:
        acts = layers["activations"]
        lines += ["", f"## Worst layers ({len(acts)} activations matched through Q/DQ, "
                      f"{layers['unmatched']} unmatched; worst SQNR first)", "",
                  "| tensor | node | op | SQNR dB | cosine | max abs err | rule |", "|---|---|---|---|---|---|---|"]
        for row in acts[:MD_LAYER_ROWS]:
            lines.append(f"| {md_escape(row['tensor'])} | {md_escape(row['node'])} | {md_escape(row['op_type'])} | "
                         f"{_fmt(row['sqnr_db'])} | {_fmt(row['cosine'])} | {_fmt(row['max_abs_error'])} | "
                         f"{md_escape(row.get('rule') or '')} |")
        if layers["weights"]:
            lines += ["", f"## Weights ({len(layers['weights'])}; worst SQNR first)", "",
                      "| weight | node | op | dtype | per channel | SQNR dB | max abs err |", "|---|---|---|---|---|---|---|"]
            for row in layers["weights"][:MD_LAYER_ROWS]:
                lines.append(f"| {md_escape(row['tensor'])} | {md_escape(row['node'])} | {md_escape(row['op_type'])} | "
                             f"{row['dtype']} | {'yes' if row['per_channel'] else 'no'} | {_fmt(row['sqnr_db'])} | "
                             f"{_fmt(row['max_abs_error'])} |")
    latency = report.get("latency")
    if latency:
        lines += ["", "## Latency", "",
                  f"{latency['method']}; ONNX Runtime CPU, threads {latency['threads'] or 'default'}, "
                  f"batch {latency['batch_size']}, {latency['warmup']} warm-up runs.", "",
                  "| model | median ms | p10 ms | p90 ms | runs |", "|---|---|---|---|---|"]
        for key, name in (("reference", reference), ("candidate", candidate)):
            t = latency[key]
            lines.append(f"| {md_escape(name)} ({key}) | {t['median_ms']:.4g} | {t['p10_ms']:.4g} | "
                         f"{t['p90_ms']:.4g} | {t['runs']} |")
        low, high = latency["ratio_interval"]
        lines += ["", f"Latency ratio (median of per-round candidate / reference ratios): **{_fmt(latency['ratio'])}**, "
                  f"95 % interval {low:.3g}–{high:.3g} "
                  f"({'tight' if latency['tight'] else 'noisy: the machine was busy, small differences are not real'})."]
    if "kernels" in report:
        ops = report["kernels"]["integer_ops"]
        lines += ["", "## Kernels", "",
                  "Integer ops after ONNX Runtime's optimizer: "
                  + (", ".join(f"{op} ×{n}" for op, n in ops.items()) or "none") + ".",
                  f"Weights stored in {'7' if report['host']['weights_reduce_range'] else '8'} bits "
                  f"(reduce_range: {report['host']['reduce_range_setting']}; int8 kernels may saturate on this "
                  f"host: {'yes' if report['host']['int8_kernels_may_saturate'] else 'no'})."]
    if "algorithms" in report:
        lines += algorithms_markdown(report["algorithms"], md_escape)
    notes = report.get("prepare", []) + report.get("plan", {}).get("notes", []) + calibration_notes(report)
    if notes or report["warnings"]:
        lines += ["", "## Notes", ""]
        lines += [f"- warning: {md_escape(w)}" for w in report["warnings"]]
        lines += [f"- {md_escape(n)}" for n in notes]
    versions_line = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", f"<sub>{versions_line}; {_hashes_line(report)}</sub>", ""]
    return "\n".join(lines)


def calibration_notes(report: dict) -> list[str]:
    """The calibration section's note (which method calibration.method auto chose), if any."""
    note = (report.get("calibration") or {}).get("note")
    return [note] if note else []


def _ranges_line(report: dict) -> str:
    """Where a quantize report's activation ranges came from: its calibration data or a table file."""
    calib = report["calibration"]
    if calib["method"] == "none":
        return "No activation ranges (quantization.mode dynamic)."
    where = (f"calibration table {calib['table']}" if "table" in calib
             else f"the calibration data {report['inputs']['calibration_data']['path']}")
    return f"Activation ranges from {md_escape(where)} (method {calib['method']}, {calib['samples']} samples)."


def _hashes_line(report: dict) -> str:
    inputs = report["inputs"]
    if report["command"] == "compare":
        return (f"reference sha256 {inputs['reference']['sha256'][:16]}…, "
                f"candidate sha256 {inputs['candidate']['sha256'][:16]}…")
    return f"model sha256 {inputs['model']['sha256'][:16]}…"


def render_junit(report: dict) -> str:
    """One test case per gate; a failed gate carries a <failure>. ElementTree escapes every string."""
    gates = report["gates"]
    suite = ET.Element("testsuite", name=f"qtool {report['command']}", tests=str(len(gates)),
                       failures=str(sum(1 for g in gates if g["passed"] is False)), errors="0",
                       skipped=str(sum(1 for g in gates if g["passed"] is None)))
    for gate in gates:
        case = ET.SubElement(suite, "testcase", classname=f"qtool.{report['command']}.gates", name=gate["name"])
        message = f"value {_fmt_gate(gate['value'])}, threshold {_fmt(gate['threshold'])}"
        if gate["passed"] is None:
            ET.SubElement(case, "skipped", message=f"not applicable: {gate['not_applicable']}")
        elif gate["passed"]:
            ET.SubElement(case, "system-out").text = message
        else:
            ET.SubElement(case, "failure", message=f"gate {gate['name']} failed: {message}", type="GateFailed")
    root = ET.Element("testsuites")
    root.append(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
