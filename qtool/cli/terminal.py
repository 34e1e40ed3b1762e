"""What qtool shows on a terminal or in a CI log: consoles, progress, summary tables.

Colour only on a terminal (never with NO_COLOR); progress bars only on a
terminal outside CI (the `CI` variable); plain periodic lines otherwise.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from qtool.reporting.markdown import calibration_notes


def make_console(stderr: bool = False) -> Console:
    """Colour only on a terminal (rich decides) and never with NO_COLOR set, not even bold."""
    return Console(stderr=stderr, color_system=None if os.environ.get("NO_COLOR") else "auto")


# What each stage counts; any other stage counts samples.
STAGE_UNITS = {"sensitivity": "nodes", "tune": "trials", "latency": "trials"}


def in_ci() -> bool:
    """Whether a CI service runs us: `CI` set (GitHub, GitLab, Jenkins' plugins, CircleCI, ... set it), not 0/false.

    Some runners give the job a pseudo-terminal; a redrawn bar there is escape codes in the log."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class StageProgress:
    """A rich progress bar on a terminal; a plain line every few seconds otherwise and in CI."""

    def __init__(self, console: Console, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.last_line = 0.0
        self.started: dict[str, tuple[float, int]] = {}  # stage → when its first report came, and its count

    def __enter__(self):
        if self.console.is_terminal and not in_ci() and not self.quiet:
            self.bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.__exit__(*exc_info)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        start, first_done = self.started.setdefault(stage, (now, done))
        unit = STAGE_UNITS.get(stage, "samples")
        # The first report comes after one batch, or after all of it (a stage whose work was done
        # earlier): the rate counts only what was done since, else a 17/17 read 486478.8 trials/s.
        rate = f"{(done - first_done) / (now - start):.1f} {unit}/s" if now > start and done > first_done else ""
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total, rate="")
            self.bar.update(self.tasks[stage], completed=done, total=total, rate=rate)
            return
        if done == total or now - self.last_line >= 5.0:
            self.last_line = now
            self.console.print(f"{stage}: {done}/{total if total else '?'} {unit}{', ' + rate if rate else ''}",
                               highlight=False)


def print_quantize_summary(console: Console, report: dict, output_dir: Path, verbose: bool) -> None:
    table = Table(title=f"qtool quantize → {output_dir}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    size = report["size"]
    table.add_row("size", f"{size['float_bytes']:,} → {size['quantized_bytes']:,} B ({size['ratio']:.2f}×)")
    table.add_row("nodes quantized", f"{report['plan']['nodes_quantized']} of "
                  f"{report['plan']['nodes_quantized'] + report['plan']['nodes_float']}")
    table.add_row("integer ops", ", ".join(f"{op}×{n}" for op, n in report["kernels"]["integer_ops"].items())
                  or "none")
    for name, figures in report["validation"]["outputs"].items():
        worst = figures.get("worst_slice")
        table.add_row(f"{name}: cosine / SQNR" + (" / worst slice" if worst else ""),
                      f"{figures['cosine']:.5f} / {figures['sqnr_db']:.2f} dB"
                      + (f" / {worst['sqnr_db']:.2f} dB (axis {worst['axis']} #{worst['index']})" if worst else ""))
    accuracy = report["validation"].get("accuracy")
    if accuracy:
        table.add_row("top-1 float → quantized", f"{accuracy['float']:.2%} → {accuracy['quantized']:.2%}")
    if report.get("latency"):  # measured with --bench (the default), not only for a max_latency_ratio gate
        table.add_row("latency", latency_text(report["latency"]))
    _add_gate_rows(table, report["gates"])
    console.print(table)
    _print_warnings(console, report["warnings"])
    for note in calibration_notes(report):  # which method calibration.method auto chose: said always
        console.print(f"note: {note}", highlight=False, markup=False)
    if verbose:
        for note in report["prepare"] + report["plan"]["notes"]:
            console.print(f"note: {note}", highlight=False, markup=False)
        for node in report["plan"]["nodes"]:
            state = "int" if node["quantized"] else "float"
            console.print(f"{state:5} {node['op_type']:<20} {node['node']}: {node['reason']}",
                          highlight=False, markup=False)


def print_inspection(console: Console, facts, verbose: bool) -> None:
    def line(label: str, text: str, style: str = "") -> None:
        text = f"[{style}]{escape(text)}[/]" if style else escape(text)
        console.print(f"[bold]{label:<14}[/]{text}", highlight=False, soft_wrap=True)

    line("model", f"{facts.path} ({facts.file_bytes:,} B)")
    line("format", f"IR {facts.ir_version}, opset {facts.opset}"
         + (f", producer {facts.producer}" if facts.producer else ""))
    if facts.family:
        line("family", facts.family)
    for tensor in facts.inputs:
        line("input", tensor.describe())
    for tensor in facts.outputs:
        line("output", tensor.describe())
    line("nodes", f"{facts.nodes} ({facts.initializers} initializers)")
    line("op types", ", ".join(f"{op}×{n}" for op, n in facts.op_types.items()))
    if facts.external_data:
        files = ", ".join(f.describe() for f in facts.external_data)
        line("external data", f"{files}; {facts.external_bytes:,} B in all")
    else:
        line("external data", "none")
    if facts.metadata_keys:
        line("metadata", ", ".join(facts.metadata_keys))
    for problem in facts.problems:
        line("problem", f"{problem.action}: {problem.message}", "red" if problem.action == "refuse" else "yellow")
    if not facts.problems:
        line("problems", "none")
    for note in facts.prepare_notes:
        line("prepare", note)
    if facts.decisions is None:
        line("quantization", "not possible until the problems above are fixed", "red")
        return
    quantized = sum(d.quantized for d in facts.decisions)
    line("quantization", f"{quantized} of {len(facts.decisions)} nodes under recipe {facts.recipe}")
    line("  quantized", ", ".join(f"{op}×{n}" for op, n in facts.quantized_op_types().items()) or "none")
    for why, ops in facts.float_reasons().items():
        line("  float", f"{why}: " + ", ".join(f"{op}×{n}" for op, n in ops.items()))
    if verbose:
        for decision in facts.decisions:
            verdict = "quantized" if decision.quantized else "float"
            line("  node", f"{decision.node} ({decision.op_type}): {verdict}, {decision.reason}")


def print_compare_summary(console: Console, report: dict, output_dir: Path, verbose: bool) -> None:
    table = Table(title=f"qtool compare → {output_dir}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    size = report["size"]
    table.add_row("size", f"{size['float_bytes']:,} → {size['quantized_bytes']:,} B ({size['ratio']:.2f}× smaller)")
    if report.get("latency"):
        table.add_row("latency", latency_text(report["latency"], "reference"))
    for name, f in report["validation"]["outputs"].items():
        agreement = f" / top-1 agr. {f['top1_agreement']:.2%}" if "top1_agreement" in f else ""
        table.add_row(f"{escape(name)}: cosine / SQNR", f"{f['cosine']:.5f} / {f['sqnr_db']:.2f} dB{agreement}")
    accuracy = report["validation"].get("accuracy")
    if accuracy:
        table.add_row("top-1 reference → candidate", f"{accuracy['float']:.2%} → {accuracy['quantized']:.2%}")
    layers = report.get("layers")
    if layers:
        for row in layers["activations"][: 10 if verbose else 3]:
            table.add_row(f"worst layer {escape(row['tensor'])} ({escape(row['op_type'])})", f"{row['sqnr_db']:.2f} dB")
    _add_gate_rows(table, report["gates"])
    console.print(table)
    _print_warnings(console, report["warnings"])


def print_sensitivity(console: Console, rows: list[dict], output_dir: Path, cache_hit: bool, verbose: bool) -> None:
    table = Table(title=f"qtool sensitivity → {output_dir}" + (" (cached)" if cache_hit else ""))
    key, heading = ("exact_match", "exact match") if any("exact_match" in row for row in rows) else ("sqnr_db", "SQNR dB")
    for column in ("rank", "node", "op", heading):
        table.add_column(column, justify="right" if column in ("rank", heading) else "left")
    for row in rows[: 20 if verbose else 5]:
        value = row.get(key)
        table.add_row(str(row["rank"]) if row.get("rank") is not None else "-", escape(row["node"]),
                      escape(row.get("op_type", "")),
                      f"{value:.{4 if key == 'exact_match' else 2}f}" if isinstance(value, float)
                      else "not measured" if value is None else str(value))
    console.print(table)


def latency_text(latency: dict, reference: str = "float") -> str:
    """A report's latency section as one summary value: medians, then the ratio to the `reference` model
    and its interval, e.g. `2.31 → 1.68 ms (0.73× float, 95 % interval 0.71–0.77)`."""
    low, high = latency["ratio_interval"]
    return (f"{milliseconds_text(latency['reference']['median_ms'])} → "
            f"{milliseconds_text(latency['candidate']['median_ms'])} ms "
            f"({latency['ratio']:.2f}× {reference}, 95 % interval {low:.2f}–{high:.2f}"
            f"{'' if latency['tight'] else ', noisy'})")


def milliseconds_text(ms: float) -> str:
    """Three significant digits in fixed point, trailing zeros kept: `1.80` beside `2.13` (`:.3g` gave
    `1.8`), `1234` (`:.3g` gave `1.23e+03`)."""
    decimals = max(0, 2 - math.floor(math.log10(abs(ms)))) if ms else 2
    return f"{ms:.{decimals}f}"


def gate_value_text(value: float, threshold: float) -> str:
    """Five significant digits, more where needed to show the margin: never `0.99 FAIL` against 0.99."""
    for digits in range(5, 13):
        text = f"{value:#.{digits}g}"
        if value == threshold or abs(float(text) - value) < abs(value - threshold) / 2:
            return text
    return repr(value)


def missed_gate_line(gate: dict, by: str) -> str:
    """`gate NAME: not met by BY (value V, threshold T)`, V as the summary table shows it (not 27.43675942149157)."""
    value = "n/a" if gate["value"] is None else gate_value_text(gate["value"], gate["threshold"])
    return f"gate {gate['name']}: not met by {by} (value {value}, threshold {gate['threshold']:g})"


def _add_gate_rows(table: Table, gates: list[dict]) -> None:
    for gate in gates:
        if gate["passed"] is None:  # checked nothing on this model: neither pass nor FAIL
            table.add_row(f"gate {gate['name']} ({gate['threshold']:g})", "[yellow]not applicable[/]")
            continue
        verdict = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        value = "n/a" if gate["value"] is None else gate_value_text(gate["value"], gate["threshold"])
        table.add_row(f"gate {gate['name']} ({gate['threshold']:g})", f"{value} {verdict}")


def _print_warnings(console: Console, warnings: list[str]) -> None:
    """Warnings quote model names: escaped, so `[...]` in a name is text, not markup."""
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
