"""The report as one self-contained HTML page: inline CSS and SVG charts, no scripts, no network.

Every string that comes from a model or a path goes through `esc` (html.escape).
"""

from __future__ import annotations

import html
import math
import shlex

from qtool.reporting.document import gate_verdict
from qtool.reporting.markdown import calibration_notes, fmt, fmt_gate, headline

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
  background:#f6f7f9;color:#1d2330;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.2rem;margin:28px 0 8px;border-bottom:1px solid #d8dce3}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff;font-size:.95rem}
.pass{background:#1f8a4c} .fail{background:#c62828}
.card{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:14px 18px;margin:12px 0}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceff3;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem;word-break:break-all}
.muted{color:#5b6475;font-size:.85rem}
svg{display:block;max-width:100%;height:auto}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.tile{background:#fff;border:1px solid #dfe3ea;border-radius:8px;padding:10px 14px;min-width:150px;flex:1}
.tile b{display:block;font-size:1.25rem} .tile span{color:#5b6475;font-size:.8rem}
.next{background:#eef4ff;border:1px solid #c9d8f5;border-radius:8px;padding:10px 14px}
details{margin:8px 0} summary{cursor:pointer;color:#2b4a8b}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
"""

BAR_COLORS = {"good": "#2e7d32", "ok": "#f9a825", "bad": "#c62828", "ref": "#5c6bc0", "cand": "#26a69a"}
MAX_BARS = 40


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _finite(value, cap: float) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    if isinstance(value, float) and math.isinf(value):
        return cap if value > 0 else 0.0
    return float(value)


def _is_inf(value) -> bool:
    return value == "inf" or (isinstance(value, float) and math.isinf(value) and value > 0)


def _sqnr_color(db: float) -> str:
    return BAR_COLORS["good"] if db >= 30 else BAR_COLORS["ok"] if db >= 15 else BAR_COLORS["bad"]


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def human_bytes(count: float) -> str:
    """1 decimal in the unit that keeps the number under 1000: 4.75e+06 B -> 4.8 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def hbar_chart(rows: list[tuple[str, float, str, str]], *, unit: str, title: str, cap: float | None = None) -> str:
    """Horizontal bars: (label, value, color, shown value). Labels escaped here."""
    if not rows:
        return ""
    label_w, bar_w, row_h, top = 330, 560, 20, 30
    values = [_finite(v, cap or 1.0) for _, v, _, _ in rows]
    scale_max = cap or max(values + [1e-12])
    height = top + row_h * len(rows) + 24
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {label_w + bar_w + 90} {height}" '
             f'width="{label_w + bar_w + 90}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" font-size="14" font-weight="600">{esc(title)}</text>']
    for i, ((label, _, color, shown), value) in enumerate(zip(rows, values)):
        y = top + i * row_h
        width = max(1.0, bar_w * min(value, scale_max) / scale_max) if scale_max > 0 else 1.0
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
                     f'<title>{esc(label)}</title>{esc(_short(label))}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 6}" fill="{color}" rx="2"/>')
        parts.append(f'<text x="{label_w + width + 4:.1f}" y="{y + 14}" font-size="11" fill="#333">{esc(shown)}</text>')
    axis_y = top + row_h * len(rows) + 4
    parts.append(f'<line x1="{label_w}" y1="{top}" x2="{label_w}" y2="{axis_y}" stroke="#888"/>')
    parts.append(f'<text x="{label_w}" y="{axis_y + 14}" font-size="11" fill="#555">0</text>')
    axis_end = human_bytes(scale_max) if unit == "B" else f"{scale_max:.3g} {unit}"
    parts.append(f'<text x="{label_w + bar_w}" y="{axis_y + 14}" font-size="11" fill="#555" text-anchor="end">'
                 f'{esc(axis_end)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def histogram_chart(edges: list[float], counts: list[int], title: str) -> str:
    """Vertical bars of per-sample SQNR: how the error is spread over the samples."""
    width, height, left, bottom = 620, 200, 40, 30
    plot_w, plot_h = width - left - 10, height - bottom - 28
    peak = max(counts + [1])
    n = len(counts)
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" font-size="14" font-weight="600">{esc(title)}</text>']
    for i, count in enumerate(counts):
        bar_h = plot_h * count / peak
        x = left + i * plot_w / n
        y = height - bottom - bar_h
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{plot_w / n - 2:.1f}" height="{bar_h:.1f}" '
                     f'fill="{_sqnr_color(edges[i])}"><title>{edges[i]:g}–{edges[i + 1]:g} dB: {count}</title></rect>')
    base = height - bottom
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#888"/>')
    for i in range(0, n + 1, max(1, n // 10)):
        x = left + i * plot_w / n
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" font-size="10" text-anchor="middle" fill="#555">{edges[i]:g}</text>')
    parts.append(f'<text x="{left + plot_w}" y="{base + 27}" font-size="10" text-anchor="end" fill="#555">'
                 f'per-sample SQNR, dB (last bin: ≥ {edges[-2]:g} dB)</text>')
    parts.append(f'<text x="{left - 4}" y="{base - plot_h + 4}" font-size="10" text-anchor="end" fill="#555">{peak}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are already-escaped HTML."""
    head = "".join(f'<th class="{"num" if i in numeric else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _gates(report: dict) -> str:
    if not report["gates"]:
        return '<p class="muted">No gates set.</p>'
    rows = [[esc(g["name"]), esc(fmt(g["threshold"])), esc(fmt_gate(g["value"])),
             esc(gate_verdict(g)) if g["passed"] is None else
             f'<span class="badge {"pass" if g["passed"] else "fail"}">{"pass" if g["passed"] else "FAIL"}</span>']
            for g in report["gates"]]
    return _table(["gate", "threshold", "value", "verdict"], rows, {1, 2})


def _outputs(report: dict) -> str:
    val = report["validation"]
    rows, charts = [], []
    for name, f in val["outputs"].items():
        rows.append([f'<span class="mono">{esc(name)}</span>'] + [esc(fmt(f.get(k))) for k in (
            "cosine", "sqnr_db", "mse", "max_abs_error", "mean_abs_error", "top1_agreement", "top5_agreement")])
        hist = f.get("sample_sqnr_histogram")
        if hist:
            charts.append(histogram_chart(hist["edges_db"], hist["counts"], f"Output {_short(name)}: error distribution"))
    parts = [_table(["output", "cosine", "SQNR dB", "MSE", "max abs err", "mean abs err", "top-1 agr.", "top-5 agr."],
                    rows, set(range(1, 8)))]
    if "accuracy" in val:
        acc = val["accuracy"]
        parts.append(f'<p>Top-1 accuracy on {acc["labelled_samples"]} labelled samples: reference '
                     f'{acc["float"]:.2%}, candidate {acc["quantized"]:.2%} (drop {acc["drop"] * 100:.2f} points).</p>')
    if val["outputs"]:
        parts.append(hbar_chart([(name, f["sqnr_db"], _sqnr_color(_finite(f["sqnr_db"], 100)), f"{fmt(f['sqnr_db'])} dB")
                                 for name, f in val["outputs"].items()], unit="dB", title="Output SQNR (higher is better)",
                                cap=max(60.0, max(_finite(f["sqnr_db"], 60.0) for f in val["outputs"].values()))))
    parts += charts
    return "\n".join(parts)


def _layers(report: dict) -> str:
    layers = report.get("layers")
    if not layers:
        return ""
    acts, weights = layers["activations"], layers["weights"]
    parts = [f'<h2>Per layer</h2><p class="muted">{len(acts)} activations matched through Q/DQ pairs, '
             f'{layers["unmatched"]} unmatched; worst SQNR first. {esc(layers["note"])}.</p>']
    exact = [r for r in weights if _is_inf(r["sqnr_db"])]  # constants stored exactly: nothing to chart
    weights = [r for r in weights if not _is_inf(r["sqnr_db"])]
    # the axis ends just past the largest finite value charted, so bars differ visibly
    cap = 1.05 * max([1.0] + [_finite(r["sqnr_db"], 0.0) for r in acts[:MAX_BARS] + weights[:MAX_BARS]
                              if not _is_inf(r["sqnr_db"])])
    if acts:
        parts.append(hbar_chart([(r["tensor"], r["sqnr_db"], _sqnr_color(_finite(r["sqnr_db"], cap)),
                                  f"{fmt(r['sqnr_db'])} dB") for r in acts[:MAX_BARS]],
                                unit="dB", title=f"Activation SQNR, worst {min(len(acts), MAX_BARS)}", cap=cap))
        rows = [[f'<span class="mono">{esc(r["tensor"])}</span>', f'<span class="mono">{esc(r["node"])}</span>',
                 esc(r["op_type"]), esc(fmt(r["sqnr_db"])), esc(fmt(r["cosine"])), esc(fmt(r["max_abs_error"])),
                 esc(r.get("rule") or "")] for r in acts]
        parts.append(f'<details><summary>All {len(rows)} activations</summary><div class="card">'
                     + _table(["tensor", "node", "op", "SQNR dB", "cosine", "max abs err", "rule"], rows, {3, 4, 5})
                     + "</div></details>")
    if weights:
        parts.append(hbar_chart([(r["tensor"], r["sqnr_db"], _sqnr_color(_finite(r["sqnr_db"], cap)),
                                  f"{fmt(r['sqnr_db'])} dB") for r in weights[:MAX_BARS]],
                                unit="dB", title=f"Weight SQNR, worst {min(len(weights), MAX_BARS)}", cap=cap))
        rows = [[f'<span class="mono">{esc(r["tensor"])}</span>', f'<span class="mono">{esc(r["node"])}</span>',
                 esc(r["op_type"]), esc(r["dtype"]), "yes" if r["per_channel"] else "no", esc(fmt(r["sqnr_db"])),
                 esc(fmt(r["max_abs_error"]))] for r in weights]
        parts.append(f'<details><summary>All {len(rows)} weights</summary><div class="card">'
                     + _table(["weight", "node", "op", "dtype", "per channel", "SQNR dB", "max abs err"], rows, {5, 6})
                     + "</div></details>")
    if exact:
        parts.append(f'<p class="muted">{len(exact)} weight(s) stored exactly (SQNR inf): '
                     + ", ".join(f'<span class="mono">{esc(r["tensor"])}</span>' for r in exact) + "</p>")
    return "\n".join(parts)


def _speed_and_size(report: dict) -> str:
    size = report["size"]
    parts = ["<h2>Size and latency</h2>",
             hbar_chart([("reference", size["float_bytes"], BAR_COLORS["ref"], human_bytes(size["float_bytes"])),
                         ("candidate", size["quantized_bytes"], BAR_COLORS["cand"], human_bytes(size["quantized_bytes"]))],
                        unit="B", title=f"File size (ratio {fmt(size['ratio'])}× smaller)")]
    latency = report.get("latency")
    if latency:
        rows = [(key, latency[key]["median_ms"], BAR_COLORS["ref" if key == "reference" else "cand"],
                 f"{latency[key]['median_ms']:.3g} ms (p10 {latency[key]['p10_ms']:.3g}, p90 {latency[key]['p90_ms']:.3g})")
                for key in ("reference", "candidate")]
        parts.append(hbar_chart(rows, unit="ms", title=f"Median latency (ratio {fmt(latency['ratio'])})"))
        parts.append(f'<p class="muted">{esc(latency["method"])}; {esc(latency["provider"])}, threads '
                     f'{esc(latency["threads"] or "default")}, batch {latency["batch_size"]}, '
                     f'{latency["reference"]["runs"]} runs each after {latency["warmup"]} warm-up runs.</p>')
    else:
        parts.append('<p class="muted">Latency not measured (pass --bench).</p>')
    return "\n".join(parts)


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{esc(value)}</b><span>{esc(label)}</span></div>'


def _worst_slice(report: dict) -> tuple[str, dict] | None:
    """The output slice with the lowest SQNR, where the report has per-slice figures."""
    found = [(name, f["worst_slice"]) for name, f in report["validation"]["outputs"].items()
             if isinstance(f.get("worst_slice"), dict) and f["worst_slice"].get("sqnr_db") is not None]
    return min(found, key=lambda item: _finite(item[1]["sqnr_db"], 1e9)) if found else None


def _accuracy_tile(report: dict) -> str:
    val = report["validation"]
    if "accuracy" in val:
        acc = val["accuracy"]
        return _tile(f"{acc['float']:.1%} → {acc['quantized']:.1%}",
                     f"top-1 accuracy, drop {acc['drop'] * 100:.2f} points on {acc['labelled_samples']} samples")
    if not val["outputs"]:
        return _tile("n/a", "accuracy")
    name, f = min(val["outputs"].items(), key=lambda item: _finite(item[1].get("cosine"), 1.0))
    return _tile(f"cosine {fmt_gate(f.get('cosine'))}", f"worst output {_short(name, 32)}, SQNR {fmt(f.get('sqnr_db'))} dB")


def next_step(report: dict) -> tuple[str, str | None]:
    """What to do after reading this report: a sentence, and the command where there is one."""
    inputs = report["inputs"]
    if not report["passed"] and report["command"] == "quantize":
        calib = (inputs.get("calibration_data") or {}).get("path") or "CALIB_DIR"
        recipe = (inputs.get("recipe") or {}).get("path")
        words = ["qtool", "tune", inputs["model"]["path"], *(["--recipe", recipe] if recipe else []), "--data", calib,
                 "--validation-data", inputs["validation_data"]["path"], "--output", "out/tune"]
        return ("A gate failed: find the layers that lose most and give them more bits:",
                " ".join(shlex.quote(str(w)) for w in words))
    if not report["passed"]:
        return ("A gate failed: `--per-layer` shows which layers lose most." if "layers" not in report
                else "A gate failed: the worst layers are under Per layer; `qtool tune` promotes them.", None)
    if "latency" not in report:
        return "Every gate passed. Measure the speed-up on your target with --bench (and --provider).", None
    return "Every gate passed: the model is ready to deploy.", None


def _summary(report: dict) -> str:
    size, latency = report["size"], report.get("latency")
    verdicts = [g["passed"] for g in report["gates"]]  # None: not applicable
    applicable = len(verdicts) - verdicts.count(None)
    tiles = [_tile("passed" if report["passed"] else "FAILED",
                   f"{verdicts.count(True)} of {applicable} gates passed"
                   + (f", {verdicts.count(None)} not applicable" if None in verdicts else "")),
             _tile(f"{fmt(size['ratio'])}× smaller",
                   f"{human_bytes(size['float_bytes'])} → {human_bytes(size['quantized_bytes'])}"),
             _tile(f"{fmt(latency['ratio'])}× latency" if latency else "not measured",
                   f"median {latency['candidate']['median_ms']:.3g} vs {latency['reference']['median_ms']:.3g} ms"
                   if latency else "latency (pass --bench)"),
             _accuracy_tile(report)]
    worst = _worst_slice(report)
    if worst is not None:
        name, sl = worst
        tiles.append(_tile(f"{fmt(sl['sqnr_db'])} dB",
                           f"worst slice of {_short(name, 24)}: index {sl.get('index')} on axis {sl.get('axis')} "
                           f"(of {sl.get('slices')})"))
    text, command = next_step(report)
    command_html = f' <code class="mono">{esc(command)}</code>' if command else ""
    return f'<div class="tiles">{"".join(tiles)}</div><p class="next"><b>Next:</b> {esc(text)}{command_html}</p>'


def _kernels(report: dict) -> str:
    if "kernels" not in report:
        return ""
    ops = report["kernels"]["integer_ops"]
    host = report.get("host", {})
    listed = ", ".join(f"{esc(op)} ×{n}" for op, n in ops.items()) or "none"
    return (f"<h2>Kernels</h2><p>Integer ops after ONNX Runtime's optimizer: {listed}.</p>"
            f'<p class="muted">Weights stored in {"7" if host.get("weights_reduce_range") else "8"} bits '
            f'(reduce_range: {esc(host.get("reduce_range_setting"))}; int8 kernels may saturate on this host: '
            f'{"yes" if host.get("int8_kernels_may_saturate") else "no"}).</p>')


def _provenance(report: dict) -> str:
    rows = []
    for role, entry in report["inputs"].items():
        if isinstance(entry, dict):
            hash_ = entry.get("sha256") or entry.get("listing_sha256") or ""
            rows.append([esc(role), f'<span class="mono">{esc(entry.get("path"))}</span>', f'<span class="mono">{esc(hash_)}</span>'])
        elif entry is not None:
            rows.append([esc(role), f'<span class="mono">{esc(entry)}</span>', ""])
    versions = ", ".join(f"{esc(k)} {esc(v)}" for k, v in report["versions"].items())
    return _table(["input", "path", "sha256"], rows) + f'<p class="muted">{versions}</p>'


def render_html(report: dict) -> str:
    passed = report["passed"]
    notes = [f"warning: {w}" for w in report["warnings"]] + report.get("prepare", []) \
        + report.get("plan", {}).get("notes", []) + calibration_notes(report)
    notes_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>qtool {esc(report['command'])} report</title>
<style>{CSS}</style></head>
<body><main>
<h1>qtool {esc(report['command'])} report <span class="badge {'pass' if passed else 'fail'}">{'passed' if passed else 'FAILED'}</span></h1>
{_summary(report)}
<p class="muted">{esc(headline(report))}</p>
<h2>Gates</h2>{_gates(report)}
<h2>Outputs ({report['validation']['samples']} samples)</h2>
{_outputs(report)}
{_layers(report)}
{_speed_and_size(report)}
{_kernels(report)}
{notes_html}
<h2>Provenance</h2>{_provenance(report)}
</main></body></html>
"""
