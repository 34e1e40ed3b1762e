"""`qtool tune`: accuracy-driven mixed precision, the fastest trial that passes the recipe's gates.

One calibration and one float run set up every trial (search/setup.py); the ranking comes from
`sensitivity`'s measurement (cached); trials run through an executor (the scale-out seam) and the
best model so far is always on disk.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from qtool.api import Progress, quantize, recipe_inputs, stage_progress
from qtool.errors import RecipeError, Terminated, UsageError, WorkerError
from qtool.evaluation.latency import BenchResult
from qtool.io.artifacts import guarded, replace_file, temporary_folder, write_text_atomic
from qtool.distributed.ray_executor import refuse_past_limit
from qtool.io.external import content_sha256, scratch
from qtool.io.targets import check_output_file, check_output_path
from qtool.io.model import file_sha256, replace_model
from qtool.recipe.load import load_recipe, parse_recipe, recipe_path_text
from qtool.recipe.schema import Recipe
from qtool.reporting import document as reporting
from qtool.reporting.search import search_report_writers
from qtool.search.executor import make_executor
from qtool.search.timing import latency_gate, latency_section, latency_verdict, latency_warnings, time_trials
from qtool.search.promote import Search, objective, pareto_frontier
from qtool.search.sensitivity import SENSITIVITY_CACHE, check_samples
from qtool.search.setup import (CACHE_FILE, TrialSetup, algorithms_the_trials_skip, budget_cut_note, cache_document,
                                check_ranking_samples, executor_section, measure_sensitivity, ranking_note,
                                read_cache, run_specs, search_inputs, setup_trials, trial_row, tune_objective,
                                unranked_note)
from qtool.search.trial import (A16, SEARCH_GATES, TrialResult, TrialSpec, build_trial_model, cache_key,
                                folder_files, promotion_overrides, trial_latency)

LATENCY_RUNS = 100  # interleaved rounds per timed trial, at most (fewer once the ratio is tight, or after 4 s)
# the finalists' second timing (search.promote.Search.confirm): more rounds, a longer bound, a tighter interval
CONFIRM = {"min_rounds": 40, "max_seconds": 15.0, "tolerance": 0.02}
TUNED_RECIPE = "recipe.tuned.yaml"


@dataclass(frozen=True)
class TuneResult:
    report: dict
    passed: bool  # the chosen trial meets every gate
    interrupted: bool
    output: Path
    terminated: bool = False  # SIGTERM rather than Ctrl-C (exit 143, not 130)
    written: bool = True  # False: stopped before a first best; an earlier run's results were left as they were
    alerts: tuple[str, ...] = ()  # the report's warnings a user must not miss (ranking, size), for stderr


def tuned_recipe_text(recipe: Recipe, overrides: list[dict], output: Path, bias_correction: bool | None = None) -> str:
    """The input recipe's own document plus `overrides` first in quantization.overrides and
    `bias_correction` (what the trials did; None: as the recipe says), `outliers: off` (the trials
    handle none) and `keep_float: off` (the trials' promotions decide) in quantization.algorithms, its relative paths rewritten for the new folder; checked to
    load before it is returned."""
    document = {}
    if recipe.source is not None:
        document = yaml.safe_load(recipe.source.read_text(encoding="utf-8")) or {}
    document.setdefault("version", 1)
    quantization = document.setdefault("quantization", {}) or {}
    document["quantization"] = quantization
    quantization["overrides"] = overrides + list(quantization.get("overrides") or [])
    algorithms = quantization.get("algorithms")
    algorithms = dict(algorithms) if isinstance(algorithms, dict) else {}
    if bias_correction is not None:  # `auto` decided once for the trials: quantize must do the same
        algorithms["bias_correction"] = bias_correction
    if recipe.quantization.algorithms.outliers != "off":  # the trials handle no outlier tensors: nor may quantize
        algorithms["outliers"] = "off"
    if recipe.quantization.algorithms.keep_float != "off":  # the trials' promotions decide what is float
        algorithms["keep_float"] = "off"
    if algorithms:
        quantization["algorithms"] = algorithms
    # every file the recipe names, relative to the new folder (set here even where `base:` gave it)
    data = recipe.data
    named = {("validation", "data"): recipe.validation.data, ("validation", "labels"): recipe.validation.labels,
             ("data", "text", "tokenizer"): data.text.tokenizer if data and data.text else None,
             ("data", "state", "initial"): data.state.initial if data and data.state else None}
    for keys, value in named.items():
        if value:
            section = document
            for key in keys[:-1]:
                section = section.setdefault(key, {}) if isinstance(section.get(key, {}), dict) else {}
            section[keys[-1]] = recipe_path_text(recipe.resolve_path(value), output)
    base = document.get("base")
    if isinstance(base, str) and recipe.source is not None and (recipe.source.parent / base).is_file():
        document["base"] = recipe_path_text(recipe.source.parent / base, output)
    header = (f"# Written by `qtool tune` from {recipe.source or 'the built-in default recipe'}.\n"
              f"# The first {len(overrides)} entries of quantization.overrides were added by the search\n"
              "# (exact node names); the rest is the input recipe, its quantization.algorithms as the\n"
              "# trials ran them. Re-run it with `qtool quantize`.\n")
    text = header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    parse_recipe(text, output / TUNED_RECIPE)
    return text


def tune(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None,
    output_dir: str | Path,
    *,
    validation_data: str | Path | None = None,
    labels: str | Path | None = None,
    max_trials: int = 24,
    time_budget: float | None = None,
    jobs: int | None = None,
    sensitivity_samples: int | None = None,
    latency_runs: int = LATENCY_RUNS,
    cache: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_event: Callable[[str], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> TuneResult:
    """Search per-node precision (16-bit activations, then float) until the recipe's gates pass.

    The best trial so far (model.onnx, recipe.tuned.yaml, report.*) is written into
    `output_dir` after every trial that improves it, each file replaced atomically, so
    an interrupted run (Ctrl-C) leaves a usable result; `interrupted` says so. At the
    end the tuned recipe is re-run through `quantize` and its model written. The ranking
    (on the first `sensitivity_samples` evaluation samples) is cached as in `sensitivity`.
    After the search, every trial is timed against the float model one after another in this
    process, `latency_runs` interleaved
    rounds each (0: not timed): trials running side by side in `jobs` processes would time
    each other's contention. `executor` and `ray_address` as in `sensitivity`: with Ray, a trial
    lost after Ray's retries is named in the report and the search goes on without it.
    """
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_samples(recipe, sensitivity_samples, "--sensitivity-samples")
    if latency_runs == 0 and "max_latency_ratio" in recipe.validation.gates:
        raise UsageError(f"{recipe.source or 'recipe'}: validation.gates.max_latency_ratio needs the trials "
                         "timed: --latency-runs above 0 (or drop the gate)")
    gates = {name: value for name, value in recipe.validation.gates.items() if name in SEARCH_GATES}
    if not gates:
        raise RecipeError(f"{recipe.source or 'recipe'}: validation.gates: tune needs a target: one of "
                          f"{', '.join(SEARCH_GATES)}")
    output = Path(output_dir)
    inputs = (data_dir, validation_data, labels, *recipe_inputs(recipe))
    check_output_path(output, model_path, overwrite, inputs)
    started = time.monotonic()
    deadline = started + time_budget if time_budget else None
    cache_path = Path(cache) if cache is not None else output / SENSITIVITY_CACHE
    check_output_file(cache_path, model_path, inputs, what="--cache file", overwrite=overwrite, ours=CACHE_FILE)
    refuse_past_limit(model_path, executor)
    cached_document = read_cache(cache_path)
    tick = stage_progress(progress)
    say = on_event or (lambda line: None)
    steps = ("float", "a16") if recipe.quantization.activations.dtype in A16 else ("float",)
    latency_limit = recipe.validation.gates.get("max_latency_ratio")
    interrupted = terminated = False
    died: WorkerError | None = None
    state: dict = {"best": None, "writes": 0}
    latencies: dict[tuple, BenchResult] = {}  # trial promotions -> timing (a finalist's: the second one)
    confirmed: dict[tuple, BenchResult] = {}  # finalist's promotions -> its first timing
    report: dict = {}
    lost: list[dict] = []
    with temporary_folder("qtool-trials-") as folder, scratch(folder), \
            make_executor(jobs, executor, ray_address) as pool:  # the work folder as in `sensitivity`
        setup = setup_trials(model_path, data_dir, recipe, folder, validation_data, labels,
                              1 if pool.jobs > 1 or pool.remote else None, tick)
        figure = tune_objective(gates, setup, recipe, model_path)
        alerts = (algorithms_the_trials_skip(recipe)
                  + check_ranking_samples(setup, sensitivity_samples, "--sensitivity-samples"))
        setup.warnings.extend(alerts)
        context = replace(setup.context, gates=gates)  # what this process builds and times trials from
        if pool.remote:  # trials elsewhere read the work folder from the object store, not as a path
            setup.context = replace(setup.context, bundle=pool.put(folder_files(folder)))
        shipped = replace(setup.context, gates=gates)
        key = cache_key(file_sha256(model_path), recipe,
                        [setup.calib_data.listing_hash(), setup.eval_data.listing_hash()],
                        f"only_quantized:{sensitivity_samples}", context.providers)
        trials_progress = tick("tune")
        search = Search([], steps, lambda specs: run_specs(pool, shipped, specs, lost), figure, max_trials,
                        deadline, pool.jobs, neighbours=setup.neighbours or {}, quantizable=setup.quantized_keys,
                        weighted=setup.weighted, graph_order=list(setup.quantizable))
        sens: dict = {"rows": [], "complete": False, "cache_hit": False}
        reserved = None  # seconds of the budget held back for the final quantize (None: no budget)

        def build_report(final: bool, stop: str) -> dict:
            return _tune_report(model_path, recipe, setup, search, sens, figure, gates, stop, final,
                                interrupted, max_trials, (time_budget, reserved), executor_section(pool, lost),
                                time.monotonic() - started, latencies, latency_runs, confirmed)

        def write_best(result: TrialResult) -> None:
            overrides = promotion_overrides(result.spec.promotions, recipe.quantization.activations.dtype)
            text = tuned_recipe_text(recipe, overrides, output, setup.bias_correction)
            if not state["writes"]:  # the folder, and an earlier run's results, are touched from here on
                with guarded(output, "create the output folder"):
                    output.mkdir(parents=True, exist_ok=True)
            with scratch():  # its spilled weights (past 2 GB) are gone once it is written
                replace_model(output / "model.onnx", build_trial_model(context, result.spec)[0])
            replace_file(output / TUNED_RECIPE, lambda path: path.write_text(text, encoding="utf-8"))
            state["best"], state["writes"] = result, state["writes"] + 1
            for name, write in search_report_writers(build_report(False, "running")).items():
                replace_file(output / name, write)
            say(f"best so far: {result.spec.key} ({_describe_trial(result, figure)}) → {output}")

        def on_trial(result: TrialResult) -> None:
            if trials_progress:
                trials_progress(len(search.order), max_trials)

        def time_trial(result: TrialResult):
            latencies[result.spec.promotions] = trial_latency(context, result.spec, latency_runs)
            return latencies[result.spec.promotions].estimate

        def retime(result: TrialResult):
            first = latencies[result.spec.promotions]
            if search.deadline is not None and time.monotonic() >= search.deadline:
                return first.estimate  # the budget is spent: the first timing stands (no finalist row)
            rounds = max(latency_runs, 2 * CONFIRM["min_rounds"])
            latencies[result.spec.promotions] = trial_latency(context, result.spec, rounds, **CONFIRM)
            confirmed[result.spec.promotions] = first
            return latencies[result.spec.promotions].estimate

        search.on_trial, search.on_improvement = on_trial, write_best
        search.time_trial = time_trial if latency_runs else None
        try:
            baseline = search.run_batch([TrialSpec("recipe as given", "baseline")], timed=False).get(())
            if baseline is None:
                raise WorkerError(f"the trial of the recipe as given was lost ({lost[-1]['reason']})")
            if deadline is not None:  # quantize re-runs the tuned recipe after the budget's trials: held back
                reserved = final_quantize_estimate(setup.calibration_s, baseline.seconds)
                search.deadline = deadline - reserved
            if not baseline.passed:
                cached = cached_document if cached_document and cached_document.get("key") == key else None
                if cached is not None:
                    rows, complete = cached["rows"], True
                else:
                    rows, complete = measure_sensitivity(setup, pool, "only_quantized", search.deadline, tick,
                                                         baseline, sensitivity_samples, lost)
                    if complete:
                        write_text_atomic(cache_path, cache_document(key, "only_quantized", model_path, rows))
                    cut = budget_cut_note(rows)
                    if cut:
                        setup.warnings.append(cut)
                        alerts.append(cut)
                sens.update(rows=rows, complete=complete, cache_hit=cached is not None)
                for note in (ranking_note(rows), unranked_note(rows)):  # ties: promoted in name order
                    if note and note not in setup.warnings:
                        setup.warnings.append(note)
                        alerts.append(note)
                search.ranking = [row["node"] for row in rows]
                search.run()
            else:
                search.stop_reason = "the recipe as given passes the gates: nothing to promote"
            if latency_runs:
                search.confirm(retime)
                time_trials(context, search.order, latency_runs, latencies, tick("latency"), search.deadline,
                            search.best)
        except KeyboardInterrupt as exc:
            interrupted, (terminated, search.stop_reason) = True, _interruption(exc)
            pool.close()
        except WorkerError as exc:
            died, search.stop_reason = exc, f"stopped: {exc}"
            pool.close()
        best = state["best"]
        reproduced = None
        if not state["writes"]:  # nothing of this run on disk: leave the folder as it was
            if died is not None:
                raise died
            return TuneResult(build_report(True, search.stop_reason), False, interrupted, output, terminated, False)
        unchecked = None
        if not interrupted and died is None and best is not None and reserved is not None \
                and deadline - time.monotonic() < reserved / 2:  # it would overrun the budget by more than half
            unchecked = not_reproduced_for_time(reserved, deadline - time.monotonic())
        elif not interrupted and died is None and best is not None:
            try:
                tuned = load_recipe(output / TUNED_RECIPE)
                again = quantize(model_path, data_dir, tuned, validation_data=validation_data, labels=labels)
                reproduced = content_sha256(again.model) == best.model_sha256
                replace_model(output / "model.onnx", again.model)
            except KeyboardInterrupt as exc:  # the best so far is on disk: the report says so, as above
                interrupted, (terminated, search.stop_reason) = True, _interruption(exc)
        report = build_report(True, search.stop_reason)
        report["chosen"]["reproduced_by_quantize"] = reproduced
        if reproduced is False:  # the figures above are the trial's, the file is quantize's: say so
            report["warnings"].append(NOT_REPRODUCED)
            alerts.append(NOT_REPRODUCED)
        if unchecked:
            report["warnings"].append(unchecked)
            alerts.append(unchecked)
        speed_gate = latency_gate(latency_limit, latencies.get(best.spec.promotions) if best else None)
        if speed_gate is not None:
            report["chosen"]["gates"].append(speed_gate)
            if not speed_gate["passed"]:
                report["passed"] = report["chosen"]["passed"] = False
            if not speed_gate["passed"] and best.passed and speed_gate["value"] is not None:
                report["search"]["stop_reason"] += (
                    f"; no trial that passes the accuracy gates meets max_latency_ratio {latency_limit:g}: "
                    "the fastest of them is written")
        for name, write in search_report_writers(report).items():
            replace_file(output / name, write)
    if died is not None:
        raise WorkerError(f"{died}; the best trial so far is kept in {output}")
    alerts += _larger_than_float(state["best"], setup.context.float_bytes)
    return TuneResult(report, bool(report["chosen"]["passed"]), interrupted, output, terminated, alerts=tuple(alerts))


def final_quantize_estimate(setup_s: float, trial_s: float) -> float:
    """Seconds the re-run of the tuned recipe through `quantize` should take, held back from --time-budget
    (unbounded, it took tune 100 s past a 4-minute budget on ppocr_det): it prepares and calibrates again as
    the setup did (`setup_s`, with one float run over the evaluation data) and compares float and quantized
    twice (with and without ORT's optimizations): two quantized runs, each about a trial (`trial_s`, the
    recipe as given's), and one more float run, about another. Measured there: 31 s setup, 9 s a trial,
    quantize 61 s against this 58 s."""
    return setup_s + 3 * trial_s


NOT_REPRODUCED = ("the tuned recipe re-run with `qtool quantize` gave a DIFFERENT model than the chosen trial: "
                  "model.onnx is quantize's (what the recipe reproduces), and the trial's figures in this report "
                  "were not measured on it; check it with `qtool compare`")


def not_reproduced_for_time(estimate: float, left: float) -> str:
    """The warning when the budget left no time for quantize's re-run of the tuned recipe."""
    return (f"the time budget left {max(left, 0):.0f} s, too little to re-run recipe.tuned.yaml through `qtool "
            f"quantize` (about {estimate:.0f} s: the setup took most of the budget): model.onnx is the chosen "
            "trial's own model, not checked against what the recipe reproduces; run `qtool quantize` with "
            "recipe.tuned.yaml to check, or give a longer --time-budget")


def _interruption(exc: KeyboardInterrupt) -> tuple[bool, str]:
    """(terminated by SIGTERM rather than Ctrl-C, the search's stop reason)."""
    terminated = isinstance(exc, Terminated)
    return terminated, "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"


def _larger_than_float(best: TrialResult | None, float_bytes: int) -> list[str]:
    """A warning when the chosen model is larger than the float model it replaces ([] otherwise)."""
    if best is None or not best.size_bytes or best.size_bytes <= float_bytes:
        return []
    return [f"the chosen model is LARGER than float: {best.size_bytes:,} B against {float_bytes:,} B (size ratio "
            f"{float_bytes / best.size_bytes:.2f}): its {len(best.spec.promotions)} promoted node(s) keep float "
            "weights, and the Q/DQ nodes, scales and zero points outweigh what the int8 weights save; add a "
            "min_size_ratio gate (e.g. 1.0) to the recipe so tune keeps only smaller trials"]


def _describe_trial(result: TrialResult, figure: str) -> str:
    value = objective(result, figure)
    shown = f"{value:.2%}" if figure == "accuracy" and math.isfinite(value) else f"{value:.4g}"
    return (f"{len(result.spec.promotions)} promotion(s), {figure} {shown}, {result.size_bytes:,} B, "
            f"gates {'pass' if result.passed else 'fail'}")


def _tune_report(model_path: Path, recipe: Recipe, setup: TrialSetup, search: Search, sens: dict, figure: str,
                 gates: dict, stop: str, final: bool, interrupted: bool, max_trials: int,
                 budget: tuple[float | None, float | None], where: dict, wall_s: float,
                 latencies: dict[tuple, BenchResult], latency_runs: int, confirmed: dict[tuple, BenchResult]) -> dict:
    float_bytes = setup.context.float_bytes
    trials = [trial_row(result, figure, float_bytes) for result in search.order]
    frontier = {result.spec.key for result in pareto_frontier(search.order, figure)}
    best = search.best
    for result, row in zip(search.order, trials):
        row["frontier"] = row["trial"] in frontier
        row["chosen"] = best is not None and row["trial"] == best.spec.key
        timing = latencies.get(result.spec.promotions)
        row["latency_ratio"] = timing.ratio if timing else None
        row["latency_ms"] = ({"float": timing.reference.median_ms, "quantized": timing.candidate.median_ms,
                              "runs": timing.candidate.runs} if timing else None)
        row["latency_interval"] = [timing.estimate.low, timing.estimate.high] if timing else None
        row["latency_tight"] = timing.tight if timing else None
        first = confirmed.get(result.spec.promotions)
        row["latency_first_ratio"] = first.ratio if first else None
    reference = next((r.accuracy.get("reference") for r in search.order if r.accuracy), None)
    size_ratio = float_bytes / best.size_bytes if best and best.size_bytes else None
    return {
        "schema_version": reporting.REPORT_SCHEMA_VERSION, "command": "tune",
        "passed": bool(best and best.passed), "final": final, "interrupted": interrupted,
        "versions": reporting.versions(), "execution_providers": reporting.execution_providers(),
        "inputs": search_inputs(model_path, recipe, setup),
        "prepare": setup.prepare_notes,
        "warnings": setup.warnings + _larger_than_float(best, float_bytes) + latency_warnings(search, latencies, confirmed),
        "target": {"gates": gates, "objective": figure, "float_accuracy": reference,
                   "float_bytes": float_bytes},
        "search": {"max_trials": max_trials, "time_budget_s": budget[0], "reserved_s": budget[1],
                   "jobs": where["jobs"], "executor": where,
                   "trials_run": len(search.order), "stop_reason": stop, "wall_s": wall_s,
                   "calibration_s": setup.calibration_s, "steps": list(search.steps)},
        "latency": {**latency_section(latency_runs, final, interrupted),
                    **latency_verdict(search, latencies, confirmed)},
        "sensitivity": {"mode": "only_quantized", "rows": sens["rows"], "complete": sens["complete"],
                        "cache_hit": sens["cache_hit"], "unnamed_nodes": setup.unnamed},
        "trials": trials,
        "chosen": {
            "trial": best.spec.key if best else None,
            "promotions": [{"node": n, "step": s} for n, s in best.spec.promotions] if best else [],
            "passed": bool(best and best.passed),
            "size_bytes": best.size_bytes if best else None,
            "size_ratio": size_ratio,  # float bytes / chosen bytes: below 1, larger than float
            "gates": reporting.gates_section(list(best.gates) if best else []),
            "model_sha256": best.model_sha256 if best else None,
        },
    }
