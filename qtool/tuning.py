"""The search use cases: sensitivity analysis and accuracy-driven mixed precision (`qtool tune`).

One calibration and one float run set up every trial; trials run through an
executor (the scale-out seam) and the best model so far is always on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml
from onnx import ModelProto

from qtool import report as reporting
from qtool.api import (Progress, check_gates_are_measurable, prepare, quantize, resolve_validation_data,
                       stage_progress)
from qtool.artifacts import check_output_path, replace_file, write_artifacts, write_text_atomic
from qtool.bench import BenchResult
from qtool.calibrate import calibrate as calibrate_tensors
from qtool.data import DataFolder, model_inputs
from qtool.errors import RecipeError, UsageError
from qtool.executor import Executor, make_executor
from qtool.model import file_sha256, model_file_bytes, save_model
from qtool.numerics import QTYPES
from qtool.plan import select_tensors
from qtool.recipe import Recipe, load_recipe, parse_recipe
from qtool.runner import int8_kernels_may_saturate, make_session, run
from qtool.search_report import search_report_writers
from qtool.sensitivity import (A16, FLOAT_MODEL, LATENCY_THREADS, SEARCH_GATES, TrialContext, TrialResult, TrialSpec,
                               build_trial_model, cache_key, float_model_name, promotion_overrides, rank_nodes,
                               run_trial, trial_latency, with_overrides, worst, write_eval_set)
from qtool.tune import Search, objective, objective_name, pareto_frontier

SENSITIVITY_CACHE = "sensitivity.cache.json"
SENSITIVITY_MODES = ("only_quantized", "only_float")
LATENCY_RUNS = 100  # interleaved rounds per timed trial (bench_models stops earlier after 4 s)


@dataclass
class _TrialSetup:
    context: TrialContext
    model: ModelProto  # the prepared float model
    prepare_notes: list[str]
    calib_data: DataFolder
    eval_data: DataFolder
    warnings: list[str]
    quantizable: list[str]  # nodes the recipe quantizes, graph order
    op_types: dict[str, str]
    unnamed: int  # quantized nodes without a name: no recipe can single them out
    calibration_s: float


def _setup_trials(model_path: Path, data_dir: Path, recipe: Recipe, folder: Path, validation_data, labels,
                  threads: int | None, tick) -> _TrialSetup:
    """Prepare, calibrate once (every tensor a trial may quantize), run the float model over the
    evaluation data, and leave what trials read in `folder`."""
    started = time.perf_counter()
    model, prepare_notes = prepare(model_path, recipe)
    inputs = model_inputs(model)
    images = recipe.data.images if recipe.data else None
    calib_data = DataFolder(data_dir, inputs, recipe.calibration.samples, images=images)
    eval_data, eval_labels, warnings = resolve_validation_data(recipe, calib_data, inputs, validation_data, labels)
    check_gates_are_measurable(recipe, eval_labels)
    selection = select_tensors(model, recipe)
    quantized = [(node, d) for node, d in zip(model.graph.node, selection.nodes) if d.quantized]
    initializers = {init.name for init in model.graph.initializer}
    float_tensors = {name for name, kind in _float_types(model).items()} - initializers
    tensors = set(selection.calibration_tensors)
    for node, _ in quantized:  # alone, a node's output gets its own Q/DQ even where the full plan fuses it
        tensors |= {name for name in list(node.input) + list(node.output) if name in float_tensors}
    act = recipe.quantization.activations
    table = calibrate_tensors(model, sorted(tensors), calib_data, recipe.calibration, QTYPES[act.dtype],
                              act.symmetric, tick("calibrate"))
    save_model(model, folder / FLOAT_MODEL)
    named = [node.name for node, _ in quantized if node.name]
    a16 = with_overrides(recipe, promotion_overrides([(named[0], "a16")], act.dtype)) if named else recipe
    if float_model_name(a16) != FLOAT_MODEL:
        save_model(prepare(model_path, a16)[0], folder / float_model_name(a16))
    session = make_session(model, threads=threads)
    batches = []
    for batch in eval_data.batches(recipe.calibration.batch_size):
        reference = run(session, batch.feeds)
        truth = [eval_labels.get(name, -1) if eval_labels else -1 for name in batch.files]
        batches.append((batch.feeds, reference, truth))
    write_eval_set(folder, batches)
    context = TrialContext(str(folder), recipe, table, int8_kernels_may_saturate(), dict(recipe.validation.gates),
                           model_file_bytes(model_path), threads)
    return _TrialSetup(context, model, prepare_notes, calib_data, eval_data, warnings, named,
                       {node.name: node.op_type for node, _ in quantized}, len(quantized) - len(named),
                       time.perf_counter() - started)


def _float_types(model: ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type == 1:  # FLOAT
            types[value.name] = 1
    return types


def _run_specs(executor: Executor, context: TrialContext, specs: list[TrialSpec]):
    for _, result in executor.map_unordered(run_trial, [(context, spec) for spec in specs]):
        yield result


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) and document.get("key") == key else None


def _sensitivity(setup: _TrialSetup, executor: Executor, mode: str, deadline: float | None, tick,
                 baseline: TrialResult, samples: int | None) -> tuple[list[dict], bool]:
    """The ranking rows, and whether every node was measured (a time budget can cut it short)."""
    if mode == "only_quantized":
        specs = [TrialSpec(f"only {node}", "sensitivity", only=node, samples=samples) for node in setup.quantizable]
    else:
        specs = [TrialSpec(f"float {node}", "sensitivity", keep_float=node, samples=samples)
                 for node in setup.quantizable]
    progress = tick("sensitivity")
    results = []
    for result in _run_specs(executor, setup.context, specs):
        results.append(result)
        if progress:
            progress(len(results), len(specs))
        if deadline is not None and time.monotonic() >= deadline and len(results) < len(specs):
            break
    rows = rank_nodes(results, setup.op_types, mode, baseline)
    measured = {row["node"] for row in rows}
    rows += [{"node": node, "op_type": setup.op_types[node], "rank": None, "note": "not measured (time budget)"}
             for node in setup.quantizable if node not in measured]
    return rows, len(results) == len(specs)


def _trial_row(result: TrialResult, objective_figure: str, float_bytes: int) -> dict:
    row = {
        "trial": result.spec.key, "kind": result.spec.kind,
        "promotions": [{"node": node, "step": step} for node, step in result.spec.promotions],
        "size_bytes": result.size_bytes, "size_ratio": float_bytes / result.size_bytes if result.size_bytes else None,
        "objective": objective(result, objective_figure), "sqnr_db": worst(result, "sqnr_db"),
        "cosine": worst(result, "cosine"), "quantized_nodes": result.quantized_nodes,
        "passed": result.passed, "seconds": result.seconds, "model_sha256": result.model_sha256,
    }
    if result.accuracy:
        row["accuracy"] = result.accuracy["candidate"]
        row["accuracy_drop"] = result.accuracy["reference"] - result.accuracy["candidate"]
    return row


def _search_inputs(model_path: Path, recipe: Recipe, setup: _TrialSetup) -> dict:
    return {
        "model": {"path": str(model_path), "sha256": file_sha256(model_path)},
        "recipe": {"path": str(recipe.source) if recipe.source else None, "resolved": recipe.as_dict()},
        "calibration_data": {"path": str(setup.calib_data.folder), "listing_sha256": setup.calib_data.listing_hash()},
        "validation_data": {"path": str(setup.eval_data.folder), "listing_sha256": setup.eval_data.listing_hash()},
    }


@dataclass(frozen=True)
class SensitivityResult:
    report: dict
    rows: list[dict]
    cache_hit: bool


def sensitivity(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    validation_data: str | Path | None = None,
    labels: str | Path | None = None,
    mode: str = "only_quantized",
    samples: int | None = None,
    jobs: int = 1,
    cache: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SensitivityResult:
    """Rank the nodes `recipe` quantizes by the output error each one causes.

    mode "only_quantized": each node quantized alone, every other node float;
    "only_float": each node kept float alone. One calibration serves every trial; `samples`
    limits each trial to the first N evaluation samples (faster, coarser).
    The ranking is cached as JSON (`cache`, default OUTPUT_DIR/sensitivity.cache.json)
    under a key of the model's sha256, the recipe and the data listings: a re-run
    with the same inputs reads it instead of measuring again.
    """
    if mode not in SENSITIVITY_MODES:
        raise UsageError(f"unknown sensitivity mode {mode!r}; allowed: {', '.join(SENSITIVITY_MODES)}")
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        check_output_path(output, model_path, overwrite, (data_dir, validation_data, labels, recipe.source))
    cache_path = Path(cache) if cache is not None else (output / SENSITIVITY_CACHE if output is not None else None)
    tick = stage_progress(progress)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qtool-trials-") as folder, make_executor(jobs) as executor:
        setup = _setup_trials(model_path, data_dir, recipe, Path(folder), validation_data, labels,
                              1 if jobs > 1 else None, tick)
        key = cache_key(file_sha256(model_path), recipe,
                        [setup.calib_data.listing_hash(), setup.eval_data.listing_hash()], f"{mode}:{samples}")
        cached = _read_cache(cache_path, key) if cache_path is not None else None
        baseline = run_trial((setup.context, TrialSpec("recipe as given", "baseline", samples=samples)))
        if cached is not None:
            rows, complete = cached["rows"], True
        else:
            rows, complete = _sensitivity(setup, executor, mode, None, tick, baseline, samples)
    document = {"format": "qtool-sensitivity", "version": 1, "key": key, "mode": mode,
                "model_sha256": file_sha256(model_path), "rows": rows}
    report = {
        "schema_version": reporting.REPORT_SCHEMA_VERSION, "command": "sensitivity", "passed": True,
        "versions": reporting.versions(), "inputs": _search_inputs(model_path, recipe, setup),
        "prepare": setup.prepare_notes, "warnings": setup.warnings,
        "sensitivity": {
            "mode": mode, "rows": rows, "complete": complete,
            "cache": {"path": str(cache_path) if cache_path else None, "key": key, "hit": cached is not None},
            "unnamed_nodes": setup.unnamed,
            "calibration_s": setup.calibration_s, "wall_s": time.perf_counter() - started,
        },
        "baseline": _trial_row(baseline, "sqnr_db", setup.context.float_bytes),
    }
    if output is not None:
        writers = {**search_report_writers(report)}
        if cache_path is not None and cache_path.parent.resolve() == output.resolve():
            writers[cache_path.name] = lambda path: path.write_text(json.dumps(_json_ready(document), indent=2) + "\n",
                                                                    encoding="utf-8")
        write_artifacts(output, overwrite, writers)
    if cache_path is not None and cache_path.parent.resolve() != (output.resolve() if output else None):
        write_text_atomic(cache_path, json.dumps(_json_ready(document), indent=2) + "\n")
    return SensitivityResult(report, rows, cached is not None)


def _json_ready(value):
    return json.loads(reporting.render_json(value))


TUNED_RECIPE = "recipe.tuned.yaml"
TUNE_ARTIFACTS = ("model.onnx", TUNED_RECIPE, "report.json", "report.md", "report.html")


@dataclass(frozen=True)
class TuneResult:
    report: dict
    passed: bool  # the chosen trial meets every gate
    interrupted: bool
    output: Path


def tuned_recipe_text(recipe: Recipe, overrides: list[dict], output: Path) -> str:
    """The input recipe's own document plus `overrides` first in quantization.overrides, its
    relative paths rewritten for the new folder; checked to load before it is returned."""
    document = {}
    if recipe.source is not None:
        document = yaml.safe_load(recipe.source.read_text(encoding="utf-8")) or {}
    document.setdefault("version", 1)
    quantization = document.setdefault("quantization", {}) or {}
    document["quantization"] = quantization
    quantization["overrides"] = overrides + list(quantization.get("overrides") or [])
    validation = document.get("validation") or {}
    for key in ("data", "labels"):
        if validation.get(key):
            validation[key] = os.path.relpath(recipe.resolve_path(validation[key]), output.resolve())
    header = (f"# Written by `qtool tune` from {recipe.source or 'the built-in default recipe'}.\n"
              f"# The first {len(overrides)} entries of quantization.overrides were added by the search\n"
              "# (exact node names); the rest is the input recipe. Re-run it with `qtool quantize`.\n")
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
    jobs: int = 1,
    sensitivity_samples: int | None = None,
    latency_runs: int = LATENCY_RUNS,
    cache: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_event: Callable[[str], None] | None = None,
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
    each other's contention.
    """
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    gates = {name: value for name, value in recipe.validation.gates.items() if name in SEARCH_GATES}
    if not gates:
        raise RecipeError(f"{recipe.source or 'recipe'}: validation.gates: tune needs a target: one of "
                          f"{', '.join(SEARCH_GATES)}")
    output = Path(output_dir)
    check_output_path(output, model_path, overwrite, (data_dir, validation_data, labels, recipe.source))
    started = time.monotonic()
    deadline = started + time_budget if time_budget else None
    cache_path = Path(cache) if cache is not None else output / SENSITIVITY_CACHE
    cached_document = _read_cache_any(cache_path)
    output.mkdir(parents=True, exist_ok=True)
    for name in TUNE_ARTIFACTS:  # an earlier run's results must not pass for this one's
        (output / name).unlink(missing_ok=True)
    tick = stage_progress(progress)
    say = on_event or (lambda line: None)
    figure = objective_name(gates)
    steps = ("a16", "float") if recipe.quantization.activations.dtype in A16 else ("float",)
    interrupted = False
    state: dict = {"best": None, "writes": 0}
    latencies: dict[tuple, BenchResult] = {}  # trial promotions -> timing
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="qtool-trials-") as folder, make_executor(jobs) as executor:
        setup = _setup_trials(model_path, data_dir, recipe, Path(folder), validation_data, labels,
                              1 if jobs > 1 else None, tick)
        context = replace(setup.context, gates=gates)
        key = cache_key(file_sha256(model_path), recipe,
                        [setup.calib_data.listing_hash(), setup.eval_data.listing_hash()],
                        f"only_quantized:{sensitivity_samples}")
        trials_progress = tick("tune")
        search = Search([], steps, lambda specs: _run_specs(executor, context, specs), figure, max_trials,
                        deadline, max(1, jobs))
        sens: dict = {"rows": [], "complete": False, "cache_hit": False}

        def build_report(final: bool, stop: str) -> dict:
            return _tune_report(model_path, recipe, setup, search, sens, figure, gates, stop, final,
                                interrupted, max_trials, time_budget, jobs, time.monotonic() - started,
                                latencies, latency_runs)

        def write_best(result: TrialResult) -> None:
            quantized, _, _ = build_trial_model(context, result.spec)
            overrides = promotion_overrides(result.spec.promotions, recipe.quantization.activations.dtype)
            text = tuned_recipe_text(recipe, overrides, output)
            replace_file(output / "model.onnx", lambda path: save_model(quantized, path))
            replace_file(output / TUNED_RECIPE, lambda path: path.write_text(text, encoding="utf-8"))
            state["best"], state["writes"] = result, state["writes"] + 1
            for name, write in search_report_writers(build_report(False, "running")).items():
                replace_file(output / name, write)
            say(f"best so far: {result.spec.key} ({_describe_trial(result, figure)}) → {output}")

        def on_trial(result: TrialResult) -> None:
            if trials_progress:
                trials_progress(len(search.order), max_trials)

        search.on_trial, search.on_improvement = on_trial, write_best
        try:
            baseline = search.run_batch([TrialSpec("recipe as given", "baseline")])[()]
            if not baseline.passed:
                cached = cached_document if cached_document and cached_document.get("key") == key else None
                if cached is not None:
                    rows, complete = cached["rows"], True
                else:
                    rows, complete = _sensitivity(setup, executor, "only_quantized", deadline, tick, baseline,
                                                  sensitivity_samples)
                    if complete:
                        write_text_atomic(cache_path, json.dumps(_json_ready(
                            {"format": "qtool-sensitivity", "version": 1, "key": key, "mode": "only_quantized",
                             "model_sha256": file_sha256(model_path), "rows": rows}), indent=2) + "\n")
                sens.update(rows=rows, complete=complete, cache_hit=cached is not None)
                search.ranking = [row["node"] for row in rows]
                search.run()
            else:
                search.stop_reason = "the recipe as given passes the gates: nothing to promote"
            if latency_runs:
                _time_trials(context, search.order, latency_runs, latencies, tick("latency"))
        except KeyboardInterrupt:
            interrupted = True
            search.stop_reason = "interrupted (Ctrl-C)"
            executor.close()
        best = state["best"]
        reproduced = None
        if not interrupted and best is not None:
            tuned = load_recipe(output / TUNED_RECIPE)
            again = quantize(model_path, data_dir, tuned, validation_data=validation_data, labels=labels)
            digest = hashlib.sha256(again.model.SerializeToString()).hexdigest()
            reproduced = digest == best.model_sha256
            replace_file(output / "model.onnx", lambda path: save_model(again.model, path))
        report = build_report(True, search.stop_reason)
        report["chosen"]["reproduced_by_quantize"] = reproduced
        for name, write in search_report_writers(report).items():
            replace_file(output / name, write)
    return TuneResult(report, bool(best and best.passed), interrupted, output)


def _time_trials(context: TrialContext, trials: list[TrialResult], runs: int, latencies: dict, progress) -> None:
    for done, result in enumerate(trials, 1):
        latencies[result.spec.promotions] = trial_latency(context, result.spec, runs)
        if progress:
            progress(done, len(trials))


def _latency_section(runs: int, final: bool, interrupted: bool) -> dict:
    status = "off" if not runs else "pending" if not final else "interrupted" if interrupted else "measured"
    return {"status": status, "runs": runs, "threads": LATENCY_THREADS, "batch_size": 1,
            "provider": "CPUExecutionProvider",
            "method": ("Timed after the search, one trial at a time in the tuning process (no trial running "
                       "beside it): every trial against the prepared float model on the first evaluation sample, in interleaved A/B rounds (order "
                       f"alternating) after warm-up, up to {runs} rounds or 4 s per trial, {LATENCY_THREADS} "
                       "ONNX Runtime intra-op thread, CPUExecutionProvider; ratio = quantized median / float "
                       "median (below 1: faster).")}


def _read_cache_any(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _describe_trial(result: TrialResult, figure: str) -> str:
    value = objective(result, figure)
    shown = f"{value:.2%}" if figure == "accuracy" and math.isfinite(value) else f"{value:.4g}"
    return (f"{len(result.spec.promotions)} promotion(s), {figure} {shown}, {result.size_bytes:,} B, "
            f"gates {'pass' if result.passed else 'fail'}")


def _tune_report(model_path: Path, recipe: Recipe, setup: _TrialSetup, search: Search, sens: dict, figure: str,
                 gates: dict, stop: str, final: bool, interrupted: bool, max_trials: int,
                 time_budget: float | None, jobs: int, wall_s: float, latencies: dict[tuple, BenchResult],
                 latency_runs: int) -> dict:
    float_bytes = setup.context.float_bytes
    trials = [_trial_row(result, figure, float_bytes) for result in search.order]
    frontier = {result.spec.key for result in pareto_frontier(search.order, figure)}
    best = search.best
    for result, row in zip(search.order, trials):
        row["frontier"] = row["trial"] in frontier
        row["chosen"] = best is not None and row["trial"] == best.spec.key
        timing = latencies.get(result.spec.promotions)
        row["latency_ratio"] = timing.ratio if timing else None
        row["latency_ms"] = ({"float": timing.reference.median_ms, "quantized": timing.candidate.median_ms,
                              "runs": timing.candidate.runs} if timing else None)
    reference = next((r.accuracy.get("reference") for r in search.order if r.accuracy), None)
    return {
        "schema_version": reporting.REPORT_SCHEMA_VERSION, "command": "tune",
        "passed": bool(best and best.passed), "final": final, "interrupted": interrupted,
        "versions": reporting.versions(), "inputs": _search_inputs(model_path, recipe, setup),
        "prepare": setup.prepare_notes, "warnings": setup.warnings,
        "target": {"gates": gates, "objective": figure, "float_accuracy": reference,
                   "float_bytes": float_bytes},
        "search": {"max_trials": max_trials, "time_budget_s": time_budget, "jobs": jobs,
                   "trials_run": len(search.order), "stop_reason": stop, "wall_s": wall_s,
                   "calibration_s": setup.calibration_s, "steps": list(search.steps)},
        "latency": _latency_section(latency_runs, final, interrupted),
        "sensitivity": {"mode": "only_quantized", "rows": sens["rows"], "complete": sens["complete"],
                        "cache_hit": sens["cache_hit"], "unnamed_nodes": setup.unnamed},
        "trials": trials,
        "chosen": {
            "trial": best.spec.key if best else None,
            "promotions": [{"node": n, "step": s} for n, s in best.spec.promotions] if best else [],
            "passed": bool(best and best.passed),
            "gates": [{"name": g.name, "threshold": g.threshold, "value": g.value, "passed": g.passed}
                      for g in (best.gates if best else ())],
            "model_sha256": best.model_sha256 if best else None,
        },
    }
