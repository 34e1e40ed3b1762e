"""The pipeline commands, calibrate, quantize and compare: each parses, calls one api function,
renders, and exits 1 when a gate fails."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from qtool import api
from qtool.cli import terminal
from qtool.cli.options import echo_json, executor_options, output_options, provider_option
from qtool.errors import EXIT_GATE_FAILED, SideFileError, UsageError, one_line
from qtool.evaluation.validation import slower_than_float
from qtool.io.feeds import load_loader
from qtool.reporting.document import render_json
from qtool.runtime.session import Provider, use_providers


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="Recipe YAML, or a preset by name (`qtool recipes`; default: int8's settings without its gates, so no gate fails).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data: a folder, or one .npy/.npz file of stacked samples (not with --calibration; optional with quantization.mode dynamic).")
@click.option("--data-loader", "data_loader", metavar="FILE.py:FUNCTION",
              help="Calibration data from a Python function returning feed dicts (runs that file's code); "
                   "without a len() and calibration.samples, its first 256 (a note says if it had more).")
@click.option("--calibration", "calibration", type=click.Path(path_type=Path),
              help="Calibration table to take ranges from instead of --data: qtool's (`qtool calibrate`), a "
                   "TensorRT calibration cache, or ONNX Runtime's TensorRT-EP table (a file or its folder); "
                   "validation data then comes from --validation-data or the recipe.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write model.onnx, report.json and report.md into.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path),
              help="labels.txt for the evaluation data (overrides validation.labels).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists (empty, or one "
                                                "qtool wrote; and a --junit file qtool did not write).")
@click.option("--per-layer", is_flag=True, help="Per-layer and per-weight error in the report.")
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Measure float vs quantized latency (interleaved, ORT CPU, a few seconds at most); "
                   "a max_latency_ratio gate measures it even with --no-bench.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads for the latency bench "
                                                           "(default 1; at most this machine's CPUs).")
@click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML file: one test case per gate "
                                                               "(an existing file qtool did not write needs --overwrite).")
@executor_options("calibration shards")
@provider_option
@output_options
def quantize(model: Path, recipe_path: Path | None, data_dir: Path | None, data_loader: str | None,
             calibration: Path | None, output_dir: Path, validation_data: Path | None, labels: Path | None, overwrite: bool,
             per_layer: bool, bench: bool, threads: int | None, junit: Path | None, executor: str,
             ray_address: str | None, providers: tuple[Provider, ...] | None, quiet: bool, verbose: bool,
             as_json: bool) -> None:
    """Quantize MODEL to int8 QDQ, validate it against the float model, write a report.

    Exit codes: 0 done and every gate passed; 1 a gate failed (artifacts
    written); 2 bad input (nothing written); 3 internal error; 4 every gate
    passed and the artifacts are complete, but --junit or the step summary
    could not be written (a failed gate and such a file: 1, both said).

    \b
    Example:
      qtool quantize model.onnx --recipe int8 --data calib/ \\
          --validation-data eval/ --output out/int8
      qtool quantize model.onnx --calibration table.json \\
          --validation-data eval/ --output out/int8
    """
    with use_providers(providers), \
            terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result, side_file = _keeping_result(lambda: api.quantize(
            model, _data(data_dir, data_loader), recipe_path, output_dir, validation_data=validation_data,
            labels=labels, calibration=calibration, overwrite=overwrite, per_layer=per_layer, bench=bench,
            threads=threads, junit=junit, step_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None,
            progress=progress, executor=executor, ray_address=ray_address))
    if as_json:
        click.echo(render_json(result.report), nl=False)
    elif not quiet:
        terminal.print_quantize_summary(terminal.make_console(), result.report, output_dir, verbose)
    if as_json and not quiet:  # stdout holds only the JSON; the summary printed the warnings otherwise
        for line in slower_than_float(result.report.get("latency")):
            click.echo(f"warning: {line}", err=True)
    failed = {gate.name for gate in result.gates if not gate.passed}
    if failed == {"max_latency_ratio"}:  # tune trades accuracy for bits; it cannot make int8 kernels faster
        hint = None if quiet else LATENCY_HINT
    else:
        hint = _tune_hint(model, recipe_path, data_dir, validation_data, labels) if data_dir and not quiet else None
    _exit_on_failed_gates(result, hint, side_file)


LATENCY_HINT = ("next: only the latency gate failed: the quantized model passes its accuracy gates (see the warnings "
                "on what they measured) but is slower than float here; ship the float model, or measure on the "
                "target machine (--provider, --threads)")


def _data(data_dir: Path | None, data_loader: str | None):
    """--data, or the function --data-loader names (its file is imported: user code runs)."""
    if data_dir is not None and data_loader is not None:
        raise UsageError("give --data or --data-loader, not both")
    return load_loader(data_loader) if data_loader is not None else data_dir


def _keeping_result(call):
    """(result, None), or (the result, the error) when only a side file (JUnit, step summary) failed:
    the run's gates and warnings are still printed before that error."""
    try:
        return call(), None
    except SideFileError as exc:
        if exc.result is None:
            raise
        return exc.result, exc


def _exit_on_failed_gates(result, hint: str | None = None, side_file: SideFileError | None = None) -> None:
    """One stderr line per failed gate, then `hint` (the next step), then the side file's error; exit 1
    when a gate failed (whatever the side file), else 4 when a side file failed; nothing when all is well."""
    for gate in result.gates:
        if not gate.passed:
            click.echo(gate.describe(), err=True)
    if not result.passed and hint:
        click.echo(hint, err=True)
    if side_file is not None:
        click.echo(f"Error: {one_line(side_file)}", err=True)
    if not result.passed:
        sys.exit(EXIT_GATE_FAILED)
    if side_file is not None:
        sys.exit(side_file.exit_code)


def _tune_hint(model: Path, recipe_path: Path | None, data_dir: Path, validation_data: Path | None,
               labels: Path | None) -> str:
    """The next command after a failed gate: tune finds the nodes to give more bits until the gates pass."""
    words = ["qtool", "tune", str(model)]
    if recipe_path is not None:
        words += ["--recipe", str(recipe_path)]
    words += ["--data", str(data_dir)]
    for option, value in (("--validation-data", validation_data), ("--labels", labels)):
        if value is not None:
            words += [option, str(value)]
    words += ["--output", "tuned/"]
    return "next: `" + " ".join(shlex.quote(word) for word in words) + "` promotes the nodes that cost the most"


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data: a folder, or one .npy/.npz file of stacked samples.")
@click.option("--data-loader", "data_loader", metavar="FILE.py:FUNCTION",
              help="Calibration data from a Python function returning feed dicts (runs that file's code); "
                   "without a len() and calibration.samples, its first 256 (a note says if it had more).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe YAML: its calibration section and which tensors it quantizes (a file or a preset name; default: int8's settings without its gates).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Calibration table file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace the table file if it exists.")
@click.option("--format", "table_format", type=click.Choice(["qtool", "trt-cache", "ort-table"]), default="qtool",
              show_default=True,
              help="qtool: the JSON table; trt-cache: TensorRT's calibration cache (text, scale = amax/127); "
                   "ort-table: a folder with ONNX Runtime's TensorRT-EP table (calibration.json/.flatbuffers/.cache).")
@executor_options("calibration shards")
@provider_option
@output_options
def calibrate(model: Path, data_dir: Path | None, data_loader: str | None, recipe_path: Path | None,
              output_path: Path, overwrite: bool, table_format: str, executor: str, ray_address: str | None,
              providers: tuple[Provider, ...] | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Measure a range for every tensor the recipe would quantize; write a calibration table.

    The table (JSON, versioned) holds per tensor its range, method and the
    observer's summary (percentiles, clipped fraction, range drift over the
    last 10 % of samples), with the model's sha256, the data listing's hash
    and the resolved recipe. `qtool quantize --calibration TABLE.json` then
    quantizes without reading calibration data. Exit 2 on bad input.

    \b
    Example:
      qtool calibrate model.onnx --data calib/ --recipe int8 --output table.json
      qtool quantize model.onnx --calibration table.json --recipe int8 \\
          --validation-data eval/ --output out/int8
    """
    with use_providers(providers), \
            terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        data = _data(data_dir, data_loader)
        if data is None:
            raise UsageError("calibration data is needed: --data DIR|FILE or --data-loader FILE.py:FUNCTION")
        result = api.calibrate(model, data, recipe_path, output_path, overwrite=overwrite, progress=progress,
                               format=table_format, executor=executor, ray_address=ray_address)
    if not quiet:  # on stderr, so also beside --json
        for line in result.warnings:
            click.echo(f"warning: {line}", err=True)
    if as_json:
        echo_json(result.document)
        return
    if quiet:
        return
    tensors = result.document["tensors"]
    if verbose:
        for name, entry in tensors.items():
            click.echo(f"{name}: [{entry['lo']:.6g}, {entry['hi']:.6g}] ({entry['method']})")
    drifts = [(entry["summary"].get("range_drift"), name) for name, entry in tensors.items()
              if isinstance(entry["summary"].get("range_drift"), (int, float))]
    written = f"{output_path} ({table_format})" if table_format != "qtool" else f"{output_path}"
    line = f"wrote {written}: {len(tensors)} tensors, {result.table.samples} samples"
    if drifts:
        drift, name = max(drifts)
        line += f"; largest range drift over the last 10 % of samples: {drift:.1%} ({name})"
    click.echo(line)
    for note in result.table.notes:  # e.g. which method calibration.method auto chose
        click.echo(f"note: {note}", err=True)

def _parse_gates(ctx, param, values: tuple[str, ...]) -> dict[str, float]:
    from qtool.evaluation.compare import GATES
    from qtool.recipe.schema import gate_problem

    gates = {}
    for text in values:
        name, sep, value = text.partition("=")
        if name not in GATES:
            raise click.BadParameter(f"unknown gate {name!r}; allowed: {', '.join(GATES)}")
        try:
            gates[name] = float(value) if sep else float("nan")
        except ValueError:
            gates[name] = float("nan")
        if gates[name] != gates[name]:
            raise click.BadParameter(f"{text!r}: expected NAME=NUMBER, e.g. min_cosine=0.99")
        if gate_problem(name, gates[name]):
            raise click.BadParameter(f"{text!r}: {gate_problem(name, gates[name])}")
    return gates


def analysis_options(command):
    """compare's `--per-layer`, `--bench`, `--threads` and `--junit` (quantize words its own help)."""
    command = click.option("--junit", type=click.Path(path_type=Path),
                           help="Write a JUnit XML file: one test case per gate (an existing file qtool did "
                                "not write needs --overwrite).")(command)
    command = click.option("--threads", type=click.IntRange(min=1),
                           help="ONNX Runtime intra-op threads for --bench (default 1, as quantize; at most "
                                "this machine's CPUs).")(command)
    command = click.option("--bench", is_flag=True,
                           help="Measure latency: interleaved A/B runs on ONNX Runtime CPU.")(command)
    command = click.option("--per-layer", is_flag=True,
                           help="Per-layer and per-weight error, matched through the Q/DQ pairs.")(command)
    return command


@click.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Evaluation data folder run through both models.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="labels.txt (`file label` per line; default: labels.txt in the data folder).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe whose validation.gates, data and batch settings apply.")
@click.option("--gate", "gates", multiple=True, callback=_parse_gates, metavar="NAME=VALUE",
              help="A quality gate (repeatable; overrides the recipe's). Names: min_cosine, min_sqnr_db, "
                   "min_slice_sqnr_db, max_accuracy_drop, min_top1_agreement, max_latency_ratio, min_size_ratio, "
                   "min_exact_match.")
@analysis_options
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write report.json, report.md and report.html into.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists (empty, or one "
                                                "qtool wrote; and a --junit file qtool did not write).")
@provider_option
@output_options
def compare(reference: Path, candidate: Path, data_dir: Path, labels: Path | None, recipe_path: Path | None,
            gates: dict, per_layer: bool, bench: bool, threads: int | None, junit: Path | None, output_dir: Path,
            overwrite: bool, providers: tuple[Provider, ...] | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Compare CANDIDATE (e.g. quantized) with REFERENCE (e.g. float) on the same inputs; write a report.

    Per output: cosine, SQNR, MSE, max/mean abs error, top-1/top-5 agreement,
    accuracy of both with labels. Exit codes: 0 every gate passed; 1 a gate
    failed (report written, one line per failed gate on stderr); 2 bad input;
    4 every gate passed but --junit or the step summary could not be written
    (a failed gate and such a file: 1, both said).

    \b
    Example:
      qtool compare model.onnx out/int8/model.onnx --data eval/ --per-layer --bench \\
          --gate min_cosine=0.99 --gate max_latency_ratio=1.2 --junit gates.xml --output out/compare
    """
    with use_providers(providers), \
            terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result, side_file = _keeping_result(lambda: api.compare(
            reference, candidate, data_dir, output_dir, labels=labels, recipe=recipe_path, gates=gates,
            per_layer=per_layer, bench=bench, threads=threads, junit=junit,
            step_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None, overwrite=overwrite, progress=progress))
    if as_json:
        click.echo(render_json(result.report), nl=False)
    elif not quiet:
        terminal.print_compare_summary(terminal.make_console(), result.report, output_dir, verbose)
    if as_json and not quiet:  # stdout holds only the JSON; the summary printed the warnings otherwise
        for line in slower_than_float(result.report.get("latency"), compared=True):
            click.echo(f"warning: {line}", err=True)
    _exit_on_failed_gates(result, side_file=side_file)
