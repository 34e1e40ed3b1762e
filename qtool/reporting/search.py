"""Reports of `qtool sensitivity` and `qtool tune` as JSON, Markdown and one self-contained HTML page.

The ranking, the trials and two inline SVG scatters: the size/accuracy frontier
and the timed trials' latency ratios, the chosen trial marked in both. Node
names come from the model: escaped everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from qtool.reporting.document import render_json
from qtool.reporting.markdown import fmt, md_escape
from qtool.reporting.html import CSS, MAX_BARS, _sqnr_color, _table, esc, hbar_chart, human_bytes

MD_ROWS = 30


def _num(value) -> float | None:
    """Report figures may be floats or the strings 'inf'/'-inf'/'nan' (JSON has no inf)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _figure(row: dict, objective: str) -> str:
    value = row.get("accuracy") if objective == "accuracy" else row.get("objective")
    number = _num(value)
    if objective == "accuracy" and number is not None:
        return f"{number:.2%}"
    return fmt(value if number is None else number)


# a gate -> the trial row's figure it reads and that figure's column heading
GATED_COLUMNS = {"max_accuracy_drop": ("accuracy_drop", "accuracy drop"), "min_top1_agreement": None,
                 "min_sqnr_db": ("sqnr_db", "SQNR dB"), "min_slice_sqnr_db": ("slice_sqnr_db", "worst slice dB"),
                 "min_cosine": ("cosine", "cosine"), "min_exact_match": ("exact_match", "exact match")}


def _figure_columns(target: dict) -> list[tuple[str, str]]:
    """(row key, heading) of the trials table's figures after the objective: each gated figure the
    objective column does not already show (what the gates column's verdict read), else SQNR."""
    shown = {target["objective"], "accuracy_drop" if target["objective"] == "accuracy" else ""}
    columns = [GATED_COLUMNS[gate] for gate in target["gates"] if GATED_COLUMNS.get(gate)
               and GATED_COLUMNS[gate][0] not in shown]
    return columns or ([] if target["objective"] == "sqnr_db" else [("sqnr_db", "SQNR dB")])


def _latency(row: dict) -> str:
    ratio = _num(row.get("latency_ratio"))
    return "—" if ratio is None else f"{ratio:.2f}×"


def _latency_note(latency: dict) -> str:
    if latency["status"] == "off":
        return "Latency: not measured (--latency-runs 0)."
    if latency["status"] == "pending":
        return "Latency: measured once the search ends."
    cut = " Interrupted: only trials timed before Ctrl-C have a figure." if latency["status"] == "interrupted" else ""
    final = ""
    if latency.get("finalists"):
        final = " Finalists (first → second timing, 95 % interval): " + "; ".join(
            f"{f['trial']}: {f['first_ratio']:.2f} → {f['ratio']:.2f} ({f['interval'][0]:.2f}–{f['interval'][1]:.2f}"
            f"{'' if f['tight'] else ', noisy'})" for f in latency["finalists"]) + f". Verdict: {latency['verdict']}."
    return f"Latency ratio (—: not timed). {latency['method']}{cut}{final}"


def _promotions(row: dict) -> str:
    steps: dict[str, int] = {}
    for item in row["promotions"]:
        steps[item["step"]] = steps.get(item["step"], 0) + 1
    return ", ".join(f"{n}× {step}" for step, n in steps.items()) or "none"


def _ranking_columns(rows: list[dict], mode: str) -> list[tuple[str, str]]:
    """(key, heading) of the figure columns: SQNR, or exact match where the model's outputs are all integer."""
    exact = any("exact_match" in row for row in rows)
    figure = ("exact_match", "exact match") if exact else ("sqnr_db", "SQNR dB")
    gain = [("exact_match_gain", "exact match gain") if exact else ("sqnr_gain_db", "SQNR gain dB")]
    return [figure, *(gain if mode == "only_float" else []), ("cosine", "cosine"), ("accuracy_drop", "accuracy drop")]


def _ranking_md(rows: list[dict], mode: str) -> list[str]:
    columns = _ranking_columns(rows, mode)
    lines = ["| rank | node | op | " + " | ".join(heading for _, heading in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in rows[:MD_ROWS]:
        cells = [fmt(row.get("rank")), md_escape(row["node"]), md_escape(row.get("op_type", "")),
                 *(fmt(row.get(key)) for key, _ in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > MD_ROWS:
        lines.append(f"\n{len(rows) - MD_ROWS} more in report.json.")
    return lines


def _mode_text(mode: str) -> str:
    return ("each node quantized alone, all others float (lowest SQNR = most sensitive)" if mode == "only_quantized"
            else "each node kept float alone, all others quantized (largest SQNR gain = most sensitive)")


def render_markdown(report: dict) -> str:
    model = md_escape(Path(report["inputs"]["model"]["path"]).name)
    if report["command"] == "sensitivity":
        sens = report["sensitivity"]
        lines = [f"# qtool sensitivity report — {model}", "",
                 f"Mode: {_mode_text(sens['mode'])}. {len(sens['rows'])} nodes; "
                 f"{'read from the cache' if sens['cache']['hit'] else 'measured'} "
                 f"(cache {md_escape(str(sens['cache']['path']))}). Recipe as given: "
                 + (f"exact match {fmt(report['baseline']['exact_match'])} (every output is integer)."
                    if "exact_match" in report["baseline"] and _num(report["baseline"]["sqnr_db"]) is None
                    else f"output SQNR {fmt(report['baseline']['sqnr_db'])} dB."), ""]
        lines += _ranking_md(sens["rows"], sens["mode"])
        return "\n".join(lines + _notes_md(report)) + "\n"
    target, search, chosen = report["target"], report["search"], report["chosen"]
    verdict = "gates pass" if report["passed"] else "**gates not met**"
    state = "interrupted — best so far" if report["interrupted"] else ("final" if report["final"] else "in progress")
    lines = [f"# qtool tune report — {model}: {verdict} ({state})", "",
             f"Target: {', '.join(f'{k} {v:g}' for k, v in target['gates'].items())} "
             f"(objective: {target['objective']}). {search['trials_run']} trials "
             f"(max {search['max_trials']}), {search['wall_s']:.1f} s, jobs {search['jobs']}. "
             f"Stopped: {md_escape(search['stop_reason'])}.", ""]
    ratio = _num(chosen.get("size_ratio"))
    lines += [f"Chosen: **{md_escape(chosen['trial'] or 'none')}** with {len(chosen['promotions'])} promotion(s)"
              + (f", size {ratio:.2f}× float" + (" (**larger than float**)" if ratio < 1 else "")
                 if ratio is not None else "")
              + (f"; the tuned recipe re-run with `qtool quantize` gives "
                 f"{'the same' if chosen.get('reproduced_by_quantize') else 'a DIFFERENT'} model"
                 if chosen.get("reproduced_by_quantize") is not None else "") + ".", ""]
    if chosen["promotions"]:
        lines += ["| node | step |", "|---|---|"]
        lines += [f"| {md_escape(p['node'])} | {p['step']} |" for p in chosen["promotions"]]
        lines.append("")
    figures = _figure_columns(target)
    lines += ["## Trials (★ chosen, ◆ on the size/accuracy frontier)", "",
              "| # | trial | promotions | size B | size ratio | latency ratio | " + target["objective"] + " | "
              + "".join(f"{heading} | " for _, heading in figures) + "gates |",
              "|---|---|---|---|---|---|---|" + "---|" * len(figures) + "---|"]
    for i, row in enumerate(report["trials"], 1):
        mark = ("★" if row["chosen"] else "") + ("◆" if row["frontier"] else "")
        lines.append(f"| {i}{mark} | {md_escape(row['trial'])} | {_promotions(row)} | {row['size_bytes']:,} | "
                     f"{fmt(row['size_ratio'])} | {_latency(row)} | {_figure(row, target['objective'])} | "
                     + "".join(f"{fmt(row.get(key))} | " for key, _ in figures)
                     + f"{'pass' if row['passed'] else 'fail'} |")
    lines += ["", _latency_note(report["latency"]), ""]
    sens = report["sensitivity"]
    if sens["rows"]:
        lines += [f"## Sensitivity ({_mode_text(sens['mode'])}"
                  f"{'; from the cache' if sens['cache_hit'] else ''})", ""]
        lines += _ranking_md(sens["rows"], sens["mode"])
    return "\n".join(lines + _notes_md(report)) + "\n"


def _notes_md(report: dict) -> list[str]:
    section = report.get("sensitivity") if report["command"] == "sensitivity" else report.get("search")
    where = (section or {}).get("executor") or {}
    lost = [f"warning: trial {entry['trial']} lost (its Ray worker or node died after every retry: "
            f"{entry['reason']}); left out" for entry in where.get("lost_trials", [])]
    ran = [f"trials ran on Ray ({where['address']}), {where['jobs']} at a time; "
           f"{where['shipped_bytes'] / 2**20:.1f} MiB shipped once through its object store"] \
        if where.get("kind") == "ray" else []
    notes = lost + [f"warning: {w}" for w in report.get("warnings", [])] + report.get("prepare", []) + ran
    return (["", "## Notes", ""] + [f"- {md_escape(n)}" for n in notes]) if notes else []


# the figure a search maximizes -> the gate that bounds it (search.promote.OBJECTIVES, read backwards)
GATE_OF_OBJECTIVE = {"accuracy": "max_accuracy_drop", "top1_agreement": "min_top1_agreement",
                     "sqnr_db": "min_sqnr_db", "cosine": "min_cosine", "exact_match": "min_exact_match"}


def gate_level(target: dict) -> float | None:
    """Where the target gate lies on the objective's axis (accuracy: float accuracy minus the allowed drop)."""
    value = target["gates"].get(GATE_OF_OBJECTIVE.get(target["objective"], ""))
    if value is None:
        return None
    if target["objective"] == "accuracy":
        reference = target.get("float_accuracy")
        return reference - value if isinstance(reference, (int, float)) else None
    return float(value)


def frontier_chart(trials: list[dict], objective: str, gate: float | None = None) -> str:
    """Size (x) against the objective (y), one dot per trial; the frontier joined; the chosen ringed."""
    return _trial_chart(trials, objective, "size_bytes", f"Trials: model size vs {objective}",
                        "model size (smaller is better)", human_bytes, join_frontier=True, gate=gate)


def latency_chart(trials: list[dict], objective: str, gate: float | None = None) -> str:
    """Latency ratio (x) against the objective (y) for the timed trials; float speed (1×) dashed; the chosen ringed."""
    return _trial_chart(trials, objective, "latency_ratio", f"Timed trials: latency ratio vs {objective}",
                        "latency ratio, quantized / float (smaller is faster)", lambda x: f"{x:.2f}×", marker=1.0,
                        gate=gate)


def _trial_chart(trials: list[dict], objective: str, x_key: str, title: str, x_label: str,
                 x_format: Callable[[float], str], join_frontier: bool = False, marker: float | None = None,
                 gate: float | None = None) -> str:
    points = [(row, _num(row.get(x_key)), _num(row.get("accuracy") if objective == "accuracy"
                                                else row.get("objective"))) for row in trials]
    points = [(row, x, y) for row, x, y in points if x is not None and y is not None]
    if not points:
        return '<p class="muted">No trial has finite figures to plot.</p>'
    width, height, left, right, top, bottom = 640, 320, 70, 20, 30, 45
    xs = [x for _, x, _ in points] + ([marker] if marker is not None else [])
    ys = [y for _, _, y in points] + ([gate] if gate is not None else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 * 0.95, x1 * 1.05) if x1 > x0 else (x0 * 0.9, x1 * 1.1 + 1)
    pad = (y1 - y0) * 0.08 or (abs(y0) * 0.05 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" font-size="14" font-weight="600">{esc(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>']
    for value, anchor in ((x0, "start"), (x1, "end")):
        parts.append(f'<text x="{px(value):.1f}" y="{height - bottom + 14}" font-size="10" fill="#555" '
                     f'text-anchor="{anchor}">{esc(x_format(value))}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 8}" font-size="11" fill="#555" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    for value in (y0 + pad, y1 - pad):
        shown = f"{value:.2%}" if objective == "accuracy" else f"{value:.4g}"
        parts.append(f'<text x="{left - 4}" y="{py(value) + 4:.1f}" font-size="10" fill="#555" '
                     f'text-anchor="end">{esc(shown)}</text>')
    if marker is not None:
        parts.append(f'<line class="marker" x1="{px(marker):.1f}" y1="{top}" x2="{px(marker):.1f}" '
                     f'y2="{height - bottom}" stroke="#888" stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{px(marker) + 3:.1f}" y="{top + 10}" font-size="10" fill="#555">'
                     f'{esc(x_format(marker))} float</text>')
    if gate is not None:  # the target: dots above it pass this gate
        shown = f"{gate:.2%}" if objective == "accuracy" else f"{gate:.4g}"
        parts.append(f'<line class="gate" x1="{left}" y1="{py(gate):.1f}" x2="{width - right}" y2="{py(gate):.1f}" '
                     f'stroke="#c62828" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{width - right}" y="{py(gate) - 4:.1f}" font-size="10" fill="#c62828" '
                     f'text-anchor="end">gate {esc(shown)}</text>')
    frontier = sorted([(x, y) for row, x, y in points if row["frontier"]])
    if join_frontier and len(frontier) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in frontier)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#5c6bc0" stroke-width="1.5" '
                     f'stroke-dasharray="4 3"/>')
    for row, x, y in points:
        color = "#2e7d32" if row["passed"] else "#c62828"
        label = (f"{row['trial']}: {row['size_bytes']:,} B, latency {_latency(row)}, "
                 f"{objective} {_figure(row, objective)}, gates {'pass' if row['passed'] else 'fail'}")
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{5 if row["frontier"] else 3.5}" '
                     f'fill="{color}" fill-opacity="0.8"><title>{esc(label)}</title></circle>')
        if row["chosen"]:
            parts.append(f'<circle class="chosen" cx="{px(x):.1f}" cy="{py(y):.1f}" r="10" fill="none" '
                         f'stroke="#1d2330" stroke-width="2"/>')
            parts.append(f'<text x="{px(x) + 13:.1f}" y="{py(y) - 8:.1f}" font-size="11" font-weight="600">chosen</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def sensitivity_chart(rows: list[dict], mode: str) -> str:
    """The most sensitive nodes first, as the ranking orders them: SQNR bars on an axis scaled to them."""
    shown = [r for r in rows if _num(r.get("sqnr_db")) is not None][:MAX_BARS]
    if not shown:
        return ""
    cap = 1.05 * max(_num(r["sqnr_db"]) for r in shown)
    return hbar_chart([(r["node"], _num(r["sqnr_db"]), _sqnr_color(_num(r["sqnr_db"])), f"{fmt(r['sqnr_db'])} dB")
                       for r in shown], unit="dB", title=f"Output SQNR with one node "
                      f"{'quantized' if mode == 'only_quantized' else 'kept float'}: the {len(shown)} most sensitive",
                      cap=max(cap, 1.0))


def _ranking_html(rows: list[dict]) -> str:
    columns = _ranking_columns(rows, "only_float")
    body = [[esc(fmt(r.get("rank"))), f'<span class="mono">{esc(r["node"])}</span>', esc(r.get("op_type", "")),
             *(esc(fmt(r.get(key))) for key, _ in columns)] for r in rows]
    return _table(["rank", "node", "op", *(heading for _, heading in columns)], body, set(range(3, 3 + len(columns))))


def render_html(report: dict) -> str:
    model = Path(report["inputs"]["model"]["path"]).name
    parts = []
    if report["command"] == "sensitivity":
        sens = report["sensitivity"]
        title = f"qtool sensitivity report — {model}"
        parts.append(f"<p>{esc(_mode_text(sens['mode']))}; {len(sens['rows'])} nodes, "
                     f"{'read from the cache' if sens['cache']['hit'] else 'measured'}.</p>")
        parts.append(sensitivity_chart(sens["rows"], sens["mode"]))
        parts.append(f'<details><summary>All {len(sens["rows"])} nodes</summary><div class="card">'
                     + _ranking_html(sens["rows"]) + "</div></details>")
    else:
        target, search, chosen = report["target"], report["search"], report["chosen"]
        title = f"qtool tune report — {model}"
        badge = f'<span class="badge {"pass" if report["passed"] else "fail"}">' \
                f'{"gates pass" if report["passed"] else "gates not met"}</span>'
        parts.append(f"<p>{badge} Target {esc(', '.join(f'{k} {v:g}' for k, v in target['gates'].items()))}; "
                     f"{search['trials_run']} trials in {search['wall_s']:.1f} s; stopped: "
                     f"{esc(search['stop_reason'])}"
                     f"{'; interrupted, best so far' if report['interrupted'] else ''}.</p>")
        ratio = _num(chosen.get("size_ratio"))
        size = "" if ratio is None else f", size {ratio:.2f}× float" + (" (<b>larger than float</b>)" if ratio < 1 else "")
        parts.append(f"<p>Chosen: <span class=\"mono\">{esc(chosen['trial'] or 'none')}</span> with "
                     f"{len(chosen['promotions'])} promotion(s){size}.</p>")
        gate = gate_level(target)
        parts.append("<h2>Size and accuracy frontier</h2>"
                     + frontier_chart(report["trials"], target["objective"], gate))
        parts.append('<p class="muted">Green: gates pass; red: fail; large dots on the frontier (dashed); '
                     'ringed: chosen; red dashes: the target gate.</p>')
        if any(_num(row.get("latency_ratio")) is not None for row in report["trials"]):
            parts.append("<h2>Latency of the timed trials</h2>"
                         + latency_chart(report["trials"], target["objective"], gate))
        parts.append(f'<p class="muted">{esc(_latency_note(report["latency"]))}</p>')
        if chosen["promotions"]:  # after the charts: a long list must not push them off the first screen
            parts.append(f'<details><summary>The chosen trial\'s {len(chosen["promotions"])} promotion(s)</summary>'
                         + _table(["node", "step"], [[f'<span class="mono">{esc(p["node"])}</span>', esc(p["step"])]
                                                     for p in chosen["promotions"]]) + "</details>")
        figures = _figure_columns(target)
        rows = [[esc(i) + (" ★" if r["chosen"] else "") + (" ◆" if r["frontier"] else ""),
                 f'<span class="mono">{esc(r["trial"])}</span>', esc(_promotions(r)), esc(f"{r['size_bytes']:,}"),
                 esc(fmt(r["size_ratio"])), esc(_latency(r)), esc(_figure(r, target["objective"])),
                 *(esc(fmt(r.get(key))) for key, _ in figures), "pass" if r["passed"] else "fail"]
                for i, r in enumerate(report["trials"], 1)]
        parts.append("<h2>Trials</h2>" + _table(["#", "trial", "promotions", "size B", "size ratio", "latency ratio",
                                                  esc(target["objective"]), *(esc(h) for _, h in figures), "gates"],
                                                 rows, set(range(3, 7 + len(figures)))))
        if report["sensitivity"]["rows"]:
            parts.append("<h2>Sensitivity</h2><details><summary>All "
                         f'{len(report["sensitivity"]["rows"])} nodes</summary><div class="card">'
                         + _ranking_html(report["sensitivity"]["rows"]) + "</div></details>")
    notes = [f"warning: {w}" for w in report.get("warnings", [])] + report.get("prepare", [])
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{esc(title)}</title>
<style>{CSS}</style></head>
<body><main>
<h1>{esc(title)}</h1>
{chr(10).join(parts)}
</main></body></html>
"""


def search_report_writers(report: dict) -> dict[str, Callable[[Path], None]]:
    return {
        "report.json": lambda path: path.write_text(render_json(report), encoding="utf-8"),
        "report.md": lambda path: path.write_text(render_markdown(report), encoding="utf-8"),
        "report.html": lambda path: path.write_text(render_html(report), encoding="utf-8"),
    }
