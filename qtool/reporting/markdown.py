"""The report rendered as Markdown (report.md, the job summary) and JUnit XML, and the figures' text forms
the HTML and the terminal share.

Every string that comes from a model is escaped before it reaches Markdown or XML.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from qtool.reporting.algorithms import algorithms_markdown
from qtool.reporting.document import gate_verdict


def md_escape(text: str) -> str:
    """Make a model-supplied string inert in Markdown (and in HTML inside Markdown), escaping only what
    Markdown reads inline: `(per-channel)` stays as written; `[x](y)` cannot become a link."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|~":
        text = text.replace(char, "\\" + char)
    text = text.replace("\\](", "\\]\\(")
    return "\\" + text if text[:1] in ("#", "+", "-", "!") else text  # no heading or list at a line's start


def fmt_gate(value) -> str:
    """Gate values with the digits a threshold like 0.9999 needs."""
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else fmt(value)


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_slice(figures: dict) -> str:
    """`12.3 (axis 1, index 4 of 84)`; n/a without a feature axis."""
    worst = figures.get("worst_slice")
    if not worst:
        return "n/a"
    return f"{fmt(worst['sqnr_db'])} (axis {worst['axis']}, index {worst['index']} of {worst['slices']})"


def _model_names(report: dict) -> tuple[str, str]:
    inputs = report["inputs"]
    if report["command"] == "compare":
        return Path(inputs["reference"]["path"]).name, Path(inputs["candidate"]["path"]).name
    return Path(inputs["model"]["path"]).name, "quantized"


def headline(report: dict) -> str:
    """One line: size, and latency when measured."""
    size = report["size"]
    parts = [f"size {size['float_bytes']:,} → {size['quantized_bytes']:,} bytes ({fmt(size['ratio'])}× smaller)"]
    latency = report.get("latency")
    if latency:
        low, high = latency["ratio_interval"]
        parts.append(f"latency ratio {fmt(latency['ratio'])} (95 % interval {low:.3g}–{high:.3g}"
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
        lines += [f"| {g['name']} | {fmt(g['threshold'])} | {fmt_gate(g['value'])} | {gate_verdict(g, '**FAIL**')} |"
                  for g in report["gates"]]
        lines.append("")
    lines += [f"## Outputs ({val['samples']} samples)", "",
              "| output | cosine | SQNR dB | worst slice dB | MSE | max abs err | mean abs err | top-1 agreement "
              "| top-5 agreement |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, f in val["outputs"].items():
        lines.append(f"| {md_escape(name)} | {fmt(f['cosine'])} | {fmt(f['sqnr_db'])} | {fmt_slice(f)} | "
                     f"{fmt(f['mse'])} | {fmt(f['max_abs_error'])} | {fmt(f['mean_abs_error'])} | "
                     f"{fmt(f.get('top1_agreement'))} | {fmt(f.get('top5_agreement'))} |")
    for name, f in val["outputs"].items():
        if "exact_match" in f:  # integer outputs (tags, class ids): the fraction equal, not cosine or SQNR
            scope = (f"the {f['exact_match_positions']:,} positions where input {md_escape(f['exact_match_masked_by'])} "
                     "is non-zero (padding not scored)" if "exact_match_masked_by" in f else "every element")
            lines += ["", f"Exact match of integer output {md_escape(name)}: {fmt(f['exact_match'])} over {scope}."]
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
                         f"{fmt(row['sqnr_db'])} | {fmt(row['cosine'])} | {fmt(row['max_abs_error'])} | "
                         f"{md_escape(row.get('rule') or '')} |")
        if layers["weights"]:
            lines += ["", f"## Weights ({len(layers['weights'])}; worst SQNR first)", "",
                      "| weight | node | op | dtype | per channel | SQNR dB | max abs err |", "|---|---|---|---|---|---|---|"]
            for row in layers["weights"][:MD_LAYER_ROWS]:
                lines.append(f"| {md_escape(row['tensor'])} | {md_escape(row['node'])} | {md_escape(row['op_type'])} | "
                             f"{row['dtype']} | {'yes' if row['per_channel'] else 'no'} | {fmt(row['sqnr_db'])} | "
                             f"{fmt(row['max_abs_error'])} |")
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
        lines += ["", f"Latency ratio (median of per-round candidate / reference ratios): **{fmt(latency['ratio'])}**, "
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
        message = f"value {fmt_gate(gate['value'])}, threshold {fmt(gate['threshold'])}"
        if gate["passed"] is None:
            ET.SubElement(case, "skipped", message=f"not applicable: {gate['not_applicable']}")
        elif gate["passed"]:
            ET.SubElement(case, "system-out").text = message
        else:
            ET.SubElement(case, "failure", message=f"gate {gate['name']} failed: {message}", type="GateFailed")
    root = ET.Element("testsuites")
    root.append(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
