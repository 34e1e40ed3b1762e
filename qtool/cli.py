"""The command line: parse arguments, call one api function, render, map errors to exit codes."""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from qtool import __version__, api
from qtool.errors import EXIT_GATE_FAILED, EXIT_INTERNAL, QtoolError


class QtoolGroup(click.Group):
    """Turns every failure into one line and its exit code, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QtoolError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing was written.", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: one line, or the traceback with --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            else:
                click.echo(f"Internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "run again with --debug for the traceback and report it.", err=True)
            sys.exit(EXIT_INTERNAL)


class StageProgress:
    """A rich progress bar on a terminal; a plain line every few seconds otherwise (CI logs)."""

    def __init__(self, console: Console, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.last_line = 0.0

    def __enter__(self):
        if self.console.is_terminal and not self.quiet:
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
        if self.bar is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(stage, total=total, rate="")
            task = self.bar.tasks[self.tasks[stage]]
            rate = f"{done / task.elapsed:.1f} samples/s" if task.elapsed else ""
            self.bar.update(self.tasks[stage], completed=done, total=total, rate=rate)
            return
        now = time.monotonic()
        if done == total or now - self.last_line >= 5.0:
            self.last_line = now
            self.console.print(f"{stage}: {done}/{total if total else '?'} samples", highlight=False)


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
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Calibration data folder.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write model.onnx, report.json and report.md into.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path),
              help="labels.txt for the evaluation data (overrides validation.labels).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary table.")
def quantize(model: Path, recipe_path: Path | None, data_dir: Path, output_dir: Path,
             validation_data: Path | None, labels: Path | None, overwrite: bool, quiet: bool) -> None:
    """Quantize MODEL to int8 QDQ, validate it against the float model, write a report.

    Exit codes: 0 done and every gate passed; 1 a gate failed (artifacts
    written); 2 bad input (nothing written); 3 internal error.

    \b
    Example:
      qtool quantize model.onnx --recipe configs/int8.yaml --data calib/ \\
          --validation-data eval/ --output out/int8
    """
    err = Console(stderr=True)
    with StageProgress(err, quiet) as progress:
        result = api.quantize(model, data_dir, recipe_path, output_dir, validation_data=validation_data,
                              labels=labels, overwrite=overwrite, progress=progress)
    if not quiet:
        _print_summary(Console(), result.report, output_dir)
    for gate in result.gates:
        if not gate.passed:
            click.echo(gate.describe(), err=True)
    if not result.passed:
        sys.exit(EXIT_GATE_FAILED)


def _print_summary(console: Console, report: dict, output_dir: Path) -> None:
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
        table.add_row(f"{name}: cosine / SQNR", f"{figures['cosine']:.5f} / {figures['sqnr_db']:.2f} dB")
    accuracy = report["validation"].get("accuracy")
    if accuracy:
        table.add_row("top-1 float → quantized", f"{accuracy['float']:.2%} → {accuracy['quantized']:.2%}")
    for gate in report["gates"]:
        verdict = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        value = "n/a" if gate["value"] is None else f"{gate['value']:.4g}"
        table.add_row(f"gate {gate['name']} ({gate['threshold']:g})", f"{value} {verdict}")
    console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
