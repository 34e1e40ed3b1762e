"""The search commands, sensitivity and tune: each runs many trials through one `qtool.search.api` call."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qtool.cli import terminal
from qtool.cli.options import executor_options, output_options, provider_option
from qtool.errors import EXIT_GATE_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED
from qtool.reporting.document import render_json
from qtool.runtime.session import Provider, use_providers
from qtool.search import api as search_api


def _duration(ctx, param, value: str | None) -> float | None:
    if value is None:
        return None
    from qtool.search.promote import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _size_text(ratio: float | None) -> str:
    """The chosen model's size against float's (`ratio`: float bytes / its bytes), in words."""
    if ratio is None:
        return ""
    return f", {ratio:.2f}× smaller than float" if ratio >= 1 else f", {1 / ratio:.2f}× LARGER than float"


def _warn_lost(lost: list[dict], quiet: bool) -> None:
    """One stderr line naming the trials Ray lost after its retries (the report lists them too)."""
    if lost and not quiet:
        names = ", ".join(entry["trial"] for entry in lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        click.echo(f"warning: {len(lost)} trial(s) lost with their Ray worker or node, left out: {names}", err=True)


def _warn(alerts, quiet: bool) -> None:
    """The warnings about the result itself (a ranking of ties, too few samples, a model larger than
    float) on stderr: the report holds them too."""
    for line in alerts if not quiet else ():
        click.echo(f"warning: {line}", err=True)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="Recipe YAML, or a preset by name (`qtool recipes`; default: int8's settings without its gates).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Calibration data folder.")
@click.option("--validation-data", type=click.Path(path_type=Path),
              help="Evaluation data folder (overrides the recipe's validation.data).")
@click.option("--labels", type=click.Path(path_type=Path), help="labels.txt for the evaluation data.")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write report.json/md/html and sensitivity.cache.json into.")
@click.option("--mode", type=click.Choice(["only_quantized", "only_float"]), default="only_quantized",
              show_default=True, help="Quantize each node alone, or keep each node alone float.")
@click.option("--samples", type=click.IntRange(min=1), help="Measure each node on the first N evaluation samples (exit 2 when their float "
                   "outputs are near zero; a warning below 8: coarse).")
@click.option("--jobs", type=click.IntRange(min=1),
              help="Trials run at once: processes here (default 1; one ONNX Runtime thread each when "
                   "above 1), or Ray tasks with --executor ray (default: the cluster's CPUs).")
@executor_options("trials")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Cache file (default: OUTPUT/sensitivity.cache.json, read before the folder is replaced); "
                   "an existing file qtool did not write needs --overwrite.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists (empty, or one "
                                                "qtool wrote; and a --cache file qtool did not write).")
@provider_option
@output_options
def sensitivity(model: Path, recipe_path: Path | None, data_dir: Path, validation_data: Path | None,
                labels: Path | None, output_dir: Path, mode: str, samples: int | None, jobs: int | None,
                executor: str, ray_address: str | None, cache: Path | None, overwrite: bool,
                providers: tuple[Provider, ...] | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Rank the nodes the recipe quantizes by the output error each one causes.

    One calibration, then one cheap trial per node (quantized alone, or kept
    float alone), ranked by output SQNR. The ranking is cached under the
    model's sha256, the recipe and the data listings: a re-run with the same
    inputs (and --overwrite, or --cache FILE) reads it instead of measuring.

    \b
    Example:
      qtool sensitivity model.onnx --recipe int8 --data calib/ \\
          --validation-data eval/ --jobs 2 --output out/sensitivity
    """
    with use_providers(providers), \
            terminal.StageProgress(terminal.make_console(stderr=True), quiet or as_json) as progress:
        result = search_api.sensitivity(model, data_dir, recipe_path, output_dir, validation_data=validation_data,
                                    labels=labels, mode=mode, samples=samples, jobs=jobs, cache=cache,
                                    overwrite=overwrite, progress=progress, executor=executor,
                                    ray_address=ray_address)
    _warn_lost(result.report["sensitivity"]["executor"]["lost_trials"], quiet)
    _warn(result.alerts, quiet)
    if as_json:
        click.echo(render_json(result.report), nl=False)
        return
    if quiet:
        return
    terminal.print_sensitivity(terminal.make_console(), result.rows, output_dir, result.cache_hit, verbose)


@click.command()
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
              help="Stop starting trials after this long, e.g. 90s, 30m, 1h30m (sensitivity and timing "
                   "included), less the time the final quantize of the tuned recipe is expected to take.")
@click.option("--jobs", type=click.IntRange(min=1),
              help="Trials run at once: processes here (default 1; one ONNX Runtime thread each when "
                   "above 1), or Ray tasks with --executor ray (default: the cluster's CPUs).")
@executor_options("trials")
@click.option("--sensitivity-samples", type=click.IntRange(min=1),
              help="Rank nodes on the first N evaluation samples (default: all; exit 2 when their "
                   "float outputs are near zero; a warning below 8: coarse).")
@click.option("--latency-runs", type=click.IntRange(min=0), default=search_api.LATENCY_RUNS, show_default=True,
              help="Time trials against the float model, one at a time on one thread: those that pass "
                   "as their batch ends (the fastest is chosen), the rest after the search; at least 20, "
                   "then until the ratio is known to ±3 %, up to N interleaved runs each; the close "
                   "finalists are timed again, longer (0: do not time; the smallest passing trial is chosen).")
@click.option("--cache", type=click.Path(path_type=Path),
              help="Sensitivity cache file (default: OUTPUT/sensitivity.cache.json); an existing file qtool "
                   "did not write needs --overwrite.")
@click.option("--overwrite", is_flag=True, help="Reuse an existing output folder (empty, or one qtool "
                                                "wrote: its results are replaced; also a --cache file qtool did "
                                                "not write).")
@provider_option
@output_options
def tune(model: Path, recipe_path: Path, data_dir: Path, validation_data: Path | None, labels: Path | None,
         output_dir: Path, max_trials: int, time_budget: float | None, jobs: int | None, executor: str,
         ray_address: str | None, sensitivity_samples: int | None, latency_runs: int, cache: Path | None,
         overwrite: bool, providers: tuple[Provider, ...] | None, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Find per-node precision (float, or 16-bit activations) that meets the recipe's gates, fastest first.

    Target: the recipe's validation.gates (max_accuracy_drop with labels,
    min_cosine, min_sqnr_db, min_slice_sqnr_db, min_top1_agreement, min_size_ratio). The most
    sensitive nodes, and beside them the first nodes in graph order (one float
    region from the inputs), are promoted a step, a few at a time, then bisected
    back to the fewest promotions and tried at the other step; of the trials that
    pass, the fastest is chosen (then the smallest). A max_latency_ratio gate
    the chosen trial misses exits 1 with it written. After every better trial the model and
    recipe.tuned.yaml (the input recipe plus exact-name overrides; re-run it
    with `qtool quantize`) are written; Ctrl-C keeps them and exits 130 (SIGTERM: 143).
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

    with use_providers(providers), \
            terminal.StageProgress(err, quiet or as_json) as progress:
        result = search_api.tune(model, data_dir, recipe_path, output_dir, validation_data=validation_data, labels=labels,
                             max_trials=max_trials, time_budget=time_budget, jobs=jobs,
                             sensitivity_samples=sensitivity_samples, latency_runs=latency_runs, cache=cache,
                             overwrite=overwrite, progress=progress, on_event=event, executor=executor,
                             ray_address=ray_address)
    report = result.report
    _warn_lost(report["search"]["executor"]["lost_trials"], quiet)
    if as_json:
        click.echo(render_json(report), nl=False)
    elif not quiet and result.written:
        chosen = report["chosen"]
        row = next((row for row in report["trials"] if row["chosen"]), {})
        ratio, interval = row.get("latency_ratio"), row.get("latency_interval")
        runs = report["search"]["trials_run"]
        click.echo(f"{runs} trial{'' if runs == 1 else 's'}, {report['search']['wall_s']:.1f} s; "
                   f"{report['search']['stop_reason']}")
        click.echo(f"chosen: {chosen['trial']} ({len(chosen['promotions'])} promotion(s)"
                   + (f", latency {ratio:.2f}× float" if ratio is not None else "")
                   + (f" (95 % interval {interval[0]:.2f}–{interval[1]:.2f})" if ratio is not None and interval else "")
                   + _size_text(chosen.get("size_ratio"))
                   + ("" if chosen["passed"] else ", FAILS the gates") + ") → "
                   f"{output_dir}/model.onnx, {output_dir}/{search_api.TUNED_RECIPE}")
        if report["latency"].get("finalists"):
            click.echo(f"latency: {report['latency']['verdict']}")
        for line in report["warnings"]:
            if line.startswith(("the chosen trial's latency", "the chosen trial is slower", "latency too noisy")):
                click.echo(f"warning: {line}", err=True)
    _warn(result.alerts, quiet)
    if result.interrupted:
        what = "Terminated" if result.terminated else "Interrupted"
        click.echo(f"{what}: best so far kept in {output_dir} (model.onnx, {search_api.TUNED_RECIPE}, report.*)."
                   if result.written else f"{what} before a first result: nothing was written.", err=True)
        sys.exit(EXIT_TERMINATED if result.terminated else EXIT_INTERRUPTED)
    if not result.passed:
        for gate in report["chosen"]["gates"]:
            if gate["passed"] is False:  # None: not applicable to this model
                click.echo(terminal.missed_gate_line(gate, "the best trial"), err=True)
        sys.exit(EXIT_GATE_FAILED)
