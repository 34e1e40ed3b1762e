"""The command line: parse arguments, call one api function, render, map errors to exit codes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from qtool import __version__, api, terminal, tuning
from qtool import starter
from qtool.recipe import recipe_json_schema
from qtool.report import render_json
from qtool.errors import (EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, QtoolError,
                          one_line, reason)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` cleans up on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class QtoolGroup(click.Group):
    """Turns every failure into one line and its exit code, in one place.

    User errors (QtoolError) exit 2 with `Error: ...`; SIGINT exits 130 and
    SIGTERM 143, after the api's cleanup ran; anything else is a bug: exit 3.
    """

    def invoke(self, ctx: click.Context):
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
        try:
            return super().invoke(ctx)
        except QtoolError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            click.echo(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'}: "
                       "nothing was written.", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: one line, or the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            else:
                click.echo(f"Internal error ({type(exc).__name__}: {reason(exc)}); "
                           "run again with --debug for the traceback and report it.", err=True)
            sys.exit(EXIT_INTERNAL)
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# --- Output conventions shared by every command -------------------------------------------


def output_options(command):
    """`--quiet`, `--verbose` and `--json`, spelled and meant the same on every command."""
    command = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout, and nothing else there.")(command)
    command = click.option("--verbose", "-v", is_flag=True, help="Print more detail.")(command)
    command = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(command)
    return command


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(cls=QtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Post-training quantization of ONNX models.

    \b
    Example:
      qtool quantize model.onnx --recipe configs/int8.yaml --data calib/ --output out/
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="Recipe YAML (default: built-in int8).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data folder (not with --calibration).")
@click.option("--calibration", "calibration", type=click.Path(path_type=Path),
              help="Calibration table from `qtool calibrate` to take ranges from instead of --data; "
                   "validation data then comes from --validation-data or the recipe.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write model.onnx, report.json and report.md into.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path),
              help="labels.txt for the evaluation data (overrides validation.labels).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--per-layer", is_flag=True, help="Per-layer and per-weight error in the report.")
@click.option("--bench", is_flag=True, help="Measure float vs quantized latency (interleaved, ORT CPU).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads for --bench.")
@click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML file: one test case per gate.")
@output_options
def quantize(model: Path, recipe_path: Path | None, data_dir: Path | None, calibration: Path | None,
             output_dir: Path, validation_data: Path | None, labels: Path | None, overwrite: bool,
             per_layer: bool, bench: bool, threads: int | None, junit: Path | None,
             quiet: bool, verbose: bool, as_json: bool) -> None:
    """Quantize MODEL to int8 QDQ, validate it against the float model, write a report.

    Exit codes: 0 done and every gate passed; 1 a gate failed (artifacts
    written); 2 bad input (nothing written); 3 internal error.

    \b
    Example:
      qtool quantize model.onnx --recipe configs/int8.yaml --data calib/ \\
          --validation-data eval/ --output out/int8
      qtool quantize model.onnx --calibration table.json \\
          --validation-data eval/ --output out/int8
    """
    with terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = api.quantize(model, data_dir, recipe_path, output_dir, validation_data=validation_data,
                              labels=labels, calibration=calibration, overwrite=overwrite, per_layer=per_layer,
                              bench=bench, threads=threads, junit=junit,
                              step_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None, progress=progress)
    if as_json:
        click.echo(render_json(result.report), nl=False)
    elif not quiet:
        terminal.print_quantize_summary(terminal.make_console(), result.report, output_dir, verbose)
    for gate in result.gates:
        if not gate.passed:
            click.echo(gate.describe(), err=True)
    if not result.passed:
        if not quiet and data_dir is not None:
            click.echo(_tune_hint(model, recipe_path, data_dir, validation_data, labels), err=True)
        sys.exit(EXIT_GATE_FAILED)


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


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Calibration data folder.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe YAML: its calibration section and which tensors it quantizes (default: built-in int8).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Calibration table file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace the table file if it exists.")
@output_options
def calibrate(model: Path, data_dir: Path, recipe_path: Path | None, output_path: Path, overwrite: bool,
              quiet: bool, verbose: bool, as_json: bool) -> None:
    """Measure a range for every tensor the recipe would quantize; write a calibration table.

    The table (JSON, versioned) holds per tensor its range, method and the
    observer's summary (percentiles, clipped fraction, range drift over the
    last 10 % of samples), with the model's sha256, the data listing's hash
    and the resolved recipe. `qtool quantize --calibration TABLE.json` then
    quantizes without reading calibration data. Exit 2 on bad input.

    \b
    Example:
      qtool calibrate model.onnx --data calib/ --recipe configs/int8.yaml --output table.json
      qtool quantize model.onnx --calibration table.json --recipe configs/int8.yaml \\
          --validation-data eval/ --output out/int8
    """
    with terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = api.calibrate(model, data_dir, recipe_path, output_path, overwrite=overwrite, progress=progress)
    if as_json:
        _echo_json(result.document)
        return
    if quiet:
        return
    tensors = result.document["tensors"]
    if verbose:
        for name, entry in tensors.items():
            click.echo(f"{name}: [{entry['lo']:.6g}, {entry['hi']:.6g}] ({entry['method']})")
    drifts = [(entry["summary"].get("range_drift"), name) for name, entry in tensors.items()
              if isinstance(entry["summary"].get("range_drift"), (int, float))]
    line = f"wrote {output_path}: {len(tensors)} tensors, {result.table.samples} samples"
    if drifts:
        drift, name = max(drifts)
        line += f"; largest range drift over the last 10 % of samples: {drift:.1%} ({name})"
    click.echo(line)


# --- inspect, schema ------------------------------------------------------------------------


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe whose rules decide what would be quantized (default: built-in int8).")
@output_options
def inspect(model: Path, recipe_path: Path | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Show what MODEL is and what qtool would do to it.

    Inputs and outputs (symbolic dims named), opset, op types, external data,
    the problems qtool would refuse or change, and which nodes the recipe
    would quantize, with the reason each other node stays float. Exits 0
    even when it lists problems; 2 only for an unreadable file.

    \b
    Example:
      qtool inspect model.onnx --recipe configs/int8.yaml
    """
    facts = api.inspect(model, recipe_path)
    if as_json:
        _echo_json(facts.as_dict())
    elif not quiet:
        terminal.print_inspection(terminal.make_console(), facts, verbose)


@main.command()
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Write the schema to this file instead of stdout.")
@output_options
def schema(output_path: Path | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Print the recipe's JSON Schema (for editors and validators).

    The schema is JSON already: --json changes nothing here.

    \b
    Example:
      qtool schema --output qtool-recipe.schema.json
    """
    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if output_path is None:
        click.echo(text, nl=False)
        return
    output_path.write_text(text, encoding="utf-8")
    if verbose:
        click.echo(f"wrote {output_path}", err=True)


# --- compare ----------------------------------------------------------------------------------


def _parse_gates(ctx, param, values: tuple[str, ...]) -> dict[str, float]:
    from qtool.compare import GATES

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
    return gates


def analysis_options(command):
    """`--per-layer`, `--bench`, `--threads` and `--junit`, shared by quantize and compare."""
    command = click.option("--junit", type=click.Path(path_type=Path),
                           help="Write a JUnit XML file: one test case per gate.")(command)
    command = click.option("--threads", type=click.IntRange(min=1),
                           help="ONNX Runtime intra-op threads for --bench (default: ORT's choice).")(command)
    command = click.option("--bench", is_flag=True,
                           help="Measure latency: interleaved A/B runs on ONNX Runtime CPU.")(command)
    command = click.option("--per-layer", is_flag=True,
                           help="Per-layer and per-weight error, matched through the Q/DQ pairs.")(command)
    return command


@main.command()
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
                   "max_accuracy_drop, min_top1_agreement, max_latency_ratio, min_size_ratio.")
@analysis_options
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write report.json, report.md and report.html into.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@output_options
def compare(reference: Path, candidate: Path, data_dir: Path, labels: Path | None, recipe_path: Path | None,
            gates: dict, per_layer: bool, bench: bool, threads: int | None, junit: Path | None, output_dir: Path,
            overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Compare CANDIDATE (e.g. quantized) with REFERENCE (e.g. float) on the same inputs; write a report.

    Per output: cosine, SQNR, MSE, max/mean abs error, top-1/top-5 agreement,
    accuracy of both with labels. Exit codes: 0 every gate passed; 1 a gate
    failed (report written, one line per failed gate on stderr); 2 bad input.

    \b
    Example:
      qtool compare model.onnx out/int8/model.onnx --data eval/ --per-layer --bench \\
          --gate min_cosine=0.99 --gate max_latency_ratio=1.2 --junit gates.xml --output out/compare
    """
    with terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = api.compare(reference, candidate, data_dir, output_dir, labels=labels, recipe=recipe_path,
                             gates=gates, per_layer=per_layer, bench=bench, threads=threads, junit=junit,
                             step_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None, overwrite=overwrite,
                             progress=progress)
    if as_json:
        click.echo(render_json(result.report), nl=False)
    elif not quiet:
        terminal.print_compare_summary(terminal.make_console(), result.report, output_dir, verbose)
    for gate in result.gates:
        if not gate.passed:
            click.echo(gate.describe(), err=True)
    if not result.passed:
        sys.exit(EXIT_GATE_FAILED)


# --- init -----------------------------------------------------------------------------------


def _float_list(ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter("expected numbers separated by commas, e.g. 0.485,0.456,0.406") from None
    if len(numbers) not in (1, 3):
        raise click.BadParameter(f"expected 1 or 3 values, got {len(numbers)}")
    return numbers


def _size(ctx, param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and 0 < int(part) <= 65536 for part in parts):
        raise click.BadParameter("expected HxW, e.g. 320x320")
    return int(parts[0]), int(parts[1])


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Calibration data folder; images there pre-fill data.images.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation folder to name in validation.data (labels.txt there adds an accuracy gate).")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Recipe file to write.")
@click.option("--channels", type=click.Choice(["RGB", "BGR"]),
              help="Channel order the model was trained on (default: the model family's, else RGB marked CHECK).")
@click.option("--mean", callback=_float_list, help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", callback=_float_list, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True),
              help="Pixels are divided by this first (default 255).")
@click.option("--size", callback=_size, help="Image size HxW (default: the model's static dims, else the "
              "model family's, else the images' one size or a square of their median shorter side, "
              "rounded to multiples of 32).")
@click.option("--schema", "schema_ref",
              help="Path or URL for the `$schema` line (default: write qtool-recipe.schema.json beside the recipe).")
@click.option("--overwrite", is_flag=True, help="Replace an existing recipe file.")
@output_options
def init(model: Path, data_dir: Path | None, validation_data: Path | None, output_path: Path,
         channels: str | None, mean, std, scale: float | None, size, schema_ref: str | None,
         overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Write a starter recipe for MODEL, every section commented.

    Inputs come from the model; with image data, data.images is pre-filled:
    size and layout from the model (or from the images when its H and W are
    dynamic); channel order and mean/std from the options, else from a model
    family the file identifies (PaddleOCR detector, classifier, recogniser),
    else neutral defaults marked CHECK. The recipe loads as written; `qtool
    quantize` runs it unchanged.

    \b
    Example:
      qtool init model.onnx --data calib/ --channels BGR \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --output recipe.yaml
    """
    choices = starter.ImageChoices(channels=channels, mean=mean, std=std, scale=scale, size=size)
    recipe, schema_file = api.init_recipe(model, output_path, data_dir=data_dir, validation_data=validation_data,
                                          image=choices, schema=schema_ref, overwrite=overwrite)
    if as_json:
        _echo_json({"recipe": str(recipe), "schema": str(schema_file) if schema_file else None})
        return
    if quiet:
        return
    click.echo(f"wrote {recipe}" + (f" and {schema_file}" if schema_file else ""))
    if verbose:
        click.echo(recipe.read_text(encoding="utf-8"), nl=False)
    if "# CHECK:" in recipe.read_text(encoding="utf-8"):
        click.echo("check the values marked CHECK in it: they are defaults, not read from your model", err=True)


# --- sensitivity, tune ------------------------------------------------------------------------


def _duration(ctx, param, value: str | None) -> float | None:
    if value is None:
        return None
    from qtool.tune import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="Recipe YAML (default: built-in int8).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Calibration data folder.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path), help="labels.txt for the evaluation data.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write report.json/md/html and sensitivity.cache.json into.")
@click.option("--mode", type=click.Choice(["only_quantized", "only_float"]), default="only_quantized",
              show_default=True, help="Quantize each node alone, or keep each node alone float.")
@click.option("--samples", type=click.IntRange(min=1), help="Measure each node on the first N evaluation samples.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run in this many processes (one ONNX Runtime thread each when above 1).")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Cache file (default: OUTPUT/sensitivity.cache.json, read before the folder is replaced).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@output_options
def sensitivity(model: Path, recipe_path: Path | None, data_dir: Path, validation_data: Path | None,
                labels: Path | None, output_dir: Path, mode: str, samples: int | None, jobs: int,
                cache: Path | None, overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Rank the nodes the recipe quantizes by the output error each one causes.

    One calibration, then one cheap trial per node (quantized alone, or kept
    float alone), ranked by output SQNR. The ranking is cached under the
    model's sha256, the recipe and the data listings: a re-run with the same
    inputs (and --overwrite, or --cache FILE) reads it instead of measuring.

    \b
    Example:
      qtool sensitivity model.onnx --recipe configs/int8.yaml --data calib/ \\
          --validation-data eval/ --jobs 2 --output out/sensitivity
    """
    with terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = tuning.sensitivity(model, data_dir, recipe_path, output_dir, validation_data=validation_data,
                                    labels=labels, mode=mode, samples=samples, jobs=jobs, cache=cache,
                                    overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(render_json(result.report), nl=False)
        return
    if quiet:
        return
    terminal.print_sensitivity(terminal.make_console(), result.rows, output_dir, result.cache_hit, verbose)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", required=True, type=click.Path(path_type=Path),
              help="Recipe YAML: the starting point; its validation.gates are the target.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Calibration data folder.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path), help="labels.txt for the evaluation data.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for model.onnx, recipe.tuned.yaml, report.json/md/html, sensitivity.cache.json.")
@click.option("--max-trials", type=click.IntRange(min=1), default=24, show_default=True,
              help="Search trials at most (the sensitivity pass is not counted).")
@click.option("--time-budget", callback=_duration, metavar="DURATION",
              help="Stop starting trials after this long, e.g. 90s, 30m, 1h (sensitivity included).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials run in this many processes (one ONNX Runtime thread each when above 1).")
@click.option("--sensitivity-samples", type=click.IntRange(min=1),
              help="Rank nodes on the first N evaluation samples (default: all).")
@click.option("--latency-runs", type=click.IntRange(min=0), default=tuning.LATENCY_RUNS, show_default=True,
              help="After the search, time every trial against the float model, one at a time on one "
                   "thread: up to N interleaved runs each (0: do not time).")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Sensitivity cache file (default: OUTPUT/sensitivity.cache.json).")
@click.option("--overwrite", is_flag=True, help="Reuse an existing output folder (its results are replaced).")
@output_options
def tune(model: Path, recipe_path: Path, data_dir: Path, validation_data: Path | None, labels: Path | None,
         output_dir: Path, max_trials: int, time_budget: float | None, jobs: int, sensitivity_samples: int | None,
         latency_runs: int, cache: Path | None, overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Find per-node precision (16-bit activations, then float) that meets the recipe's gates.

    Target: the recipe's validation.gates (max_accuracy_drop with labels,
    min_cosine, min_sqnr_db, min_top1_agreement, min_size_ratio). The most
    sensitive nodes are promoted a step, a few at a time, then bisected back
    to the fewest promotions. After every better trial the model and
    recipe.tuned.yaml (the input recipe plus exact-name overrides; re-run it
    with `qtool quantize`) are written; Ctrl-C keeps them and exits 130.
    Exit codes: 0 gates met; 1 best found does not meet them; 2 bad input.

    \b
    Example:
      qtool tune model.onnx --recipe recipe.yaml --data calib/ --validation-data eval/ \\
          --max-trials 20 --time-budget 30m --jobs 2 --output out/tuned
    """
    err = terminal.make_console(stderr=True)

    def event(line: str) -> None:
        if verbose and not as_json:
            err.print(line, highlight=False, markup=False)

    with terminal.StageProgress(err, quiet or as_json) as progress:
        result = tuning.tune(model, data_dir, recipe_path, output_dir, validation_data=validation_data, labels=labels,
                             max_trials=max_trials, time_budget=time_budget, jobs=jobs,
                             sensitivity_samples=sensitivity_samples, latency_runs=latency_runs, cache=cache,
                             overwrite=overwrite, progress=progress, on_event=event)
    report = result.report
    if as_json:
        click.echo(render_json(report), nl=False)
    elif not quiet:
        chosen = report["chosen"]
        ratio = next((row["latency_ratio"] for row in report["trials"] if row["chosen"]), None)
        click.echo(f"{report['search']['trials_run']} trials, {report['search']['wall_s']:.1f} s; "
                   f"{report['search']['stop_reason']}")
        click.echo(f"chosen: {chosen['trial']} ({len(chosen['promotions'])} promotion(s)"
                   + (f", latency {ratio:.2f}× float" if ratio is not None else "") + ") → "
                   f"{output_dir}/model.onnx, {output_dir}/{tuning.TUNED_RECIPE}")
    if result.interrupted:
        click.echo(f"Interrupted: best so far kept in {output_dir} (model.onnx, {tuning.TUNED_RECIPE}, report.*).",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not result.passed:
        for gate in report["chosen"]["gates"]:
            if not gate["passed"]:
                click.echo(f"gate {gate['name']}: not met by the best trial (value {gate['value']}, "
                           f"threshold {gate['threshold']:g})", err=True)
        sys.exit(EXIT_GATE_FAILED)
