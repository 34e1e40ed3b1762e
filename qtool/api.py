"""The single-model use cases as plain functions: quantize, calibrate, compare, inspect, init.

The CLI calls these; so can any Python program (`import qtool`). The search
use cases built on them (sensitivity, tune) live in `qtool.search.api`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from onnx import ModelProto

from qtool import __version__
from qtool.authoring import inspection
from qtool.authoring import starter
from qtool.calibration import interchange
from qtool.calibration.calibrate import (CalibrationTable, check_table, recipe_differences, save_table,
                                        table_document)
from qtool.calibration.shards import calibrate_with
from qtool.distributed.ray_executor import refuse_past_limit
from qtool.errors import ModelError, QtoolError, RecipeError, SideFileError, UsageError
from qtool.evaluation.bias_choice import BiasOutcome, correct_bias
from qtool.evaluation.float_choice import FloatEndsOutcome, choose_float_ends
from qtool.evaluation.compare import GATES, GateResult, check_gates, compare_models
from qtool.evaluation.latency import BenchResult, bench_models
from qtool.evaluation.method_choice import choose_method
from qtool.evaluation.validation import (accuracy_warnings, check_gates_are_measurable, extra_figures,
                                         kernel_gap_cause, kernel_warnings, layers_and_latency,
                                         resolve_validation_data, slower_than_float, unmeasurable_gates)
from qtool.io.artifacts import guarded, write_artifacts, write_text_atomic
from qtool.io.data import model_inputs, read_labels
from qtool.io.external import in_scratch
from qtool.io.feeds import Loader, open_data
from qtool.io.fingerprint import as_loaded, fingerprint
from qtool.io.targets import check_output_file, check_output_path
from qtool.io.model import (QUANTIZED_OP_TYPES, copy_metadata, file_sha256, load_model, model_file_bytes, opset_version,
                            proto_size, read_header, save_model, upgrade_opset, into_memory)
from qtool.numerics import QTYPES
from qtool.quantization.algorithms.bias_correction import NO_DATA
from qtool.quantization.algorithms.equalization import EqualizedPair, equalize
from qtool.quantization.algorithms.outliers import handle_outliers
from qtool.quantization.algorithms.smoothing import smooth
from qtool.quantization.coverage import check_coverage
from qtool.quantization.placement import float_nodes_on_integer_kernels, plan_and_apply, preview_plan
from qtool.quantization.precedence import unmatched_overrides
from qtool.quantization.plan import required_opset, select_tensors
from qtool.quantization.prepare import prepare_model
from qtool.quantization.qdq import ensure_opset
from qtool.quantization.widen import widen_to_float32
from qtool.recipe.load import load_recipe, parse_recipe
from qtool.recipe.schema import Recipe, gate_problem, recipe_json_schema
from qtool.reporting import document as reporting
from qtool.reporting.algorithms import algorithms_section
from qtool.reporting.files import check_ci_files, report_writers, write_ci_files
from qtool.runtime.session import (INTEGER_OP_TYPES, check_runnable, int8_kernels_may_saturate, op_histogram,
                                   optimized_graph, tensor_shapes)

# progress(stage, done, total): the CLI renders it; nothing below the CLI prints.
Progress = Callable[[str, int, int | None], None]
LATENCY_PROBE_ROUNDS = 60  # qtool init's float/int8 timing: a few seconds at most
BENCH_THREADS = 1  # quantize and compare time on one intra-op thread unless told otherwise: the per-core ratio


@dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    report: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


def prepare(model_path: Path, recipe: Recipe | None = None) -> tuple[ModelProto, list[str]]:
    """load → opset upgrade → graph clean-up → the opset the recipe's types need → the recipe's
    equalization; returns the model and what was done."""
    model, notes, _ = _prepare(model_path, recipe)
    return model, notes


def _prepare(model_path: Path, recipe: Recipe | None) -> tuple[ModelProto, list[str], list[EqualizedPair]]:
    repairs: list[str] = []
    model = load_model(model_path, repairs=repairs)
    widened = widen_to_float32(model)  # first: ONNX Runtime's CPU kernels barely know bfloat16
    check_runnable(model, model_path)
    model, upgrade_note = upgrade_opset(model, model_path)
    model, notes = prepare_model(model)
    model, opset_note = ensure_opset(model, required_opset(recipe)) if recipe else (model, None)
    pairs: list[EqualizedPair] = []
    if recipe and recipe.quantization.algorithms.equalization:
        model, pairs = equalize(model)
    equalized = f"equalization: {len(pairs)} Conv pairs rescaled" if pairs else None
    return model, [note for note in [*repairs, widened, upgrade_note, *notes, opset_note, equalized] if note], pairs


@in_scratch  # past 2 GB: the weights' work files go when it returns
def inspect(model_path: str | Path, recipe: Recipe | str | Path | None = None) -> inspection.Inspection:
    """What a model is and what qtool would do to it under `recipe`.

    Problems qtool would refuse or change later are listed, not raised; only
    a file that is not a readable ONNX model is an error.
    """
    model_path = Path(model_path)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    header = read_header(model_path)
    problems = inspection.load_problems(header, model_path)
    notes: list[str] = []
    decisions = None
    upgraded = None
    if not problems:
        try:
            model, notes = prepare(model_path, recipe)
            upgraded = True
        except ModelError as exc:
            problems.append(inspection.Problem("refuse", str(exc)))
            upgraded = False
        else:  # the placement pass too, as quantize runs it: the two counts agree
            decisions = preview_plan(model, recipe, select_tensors(model, recipe),
                                     int8_kernels_may_saturate()).plan.nodes
            notes.append("nodes quantized: as `qtool quantize` places them (placeholder ranges); calibration can "
                         "keep a few more float (degenerate ranges, Concat inputs far apart; keep_float auto's "
                         "end regions, measured on the data)")
            if recipe.quantization.placement == "fast":
                notes.append("placement fast: the groups quantize keeps float for speed are estimated on the tensor "
                             "shapes of a calibration sample, which inspect does not read: counted as fused")
    opset = inspection.opset_problem(opset_version(header), upgraded)
    return inspection.describe_model(
        header, model_path, ([opset] if opset else []) + problems, prepare_notes=notes,
        recipe=str(recipe.source) if recipe.source else "built-in default", decisions=decisions,
    )


@dataclass(frozen=True)
class InitResult:
    recipe: Path
    schema: Path | None  # the JSON Schema written beside it (None: `schema` named one)
    latency_ratio: float | None  # the starter's int8 model against float, as measured (None: no --data to time)
    warnings: list[str]  # the latency gate likely to fail (also in the recipe's comments), or why it was not timed


def init_recipe(
    model_path: str | Path,
    output: str | Path,
    *,
    data_dir: str | Path | None = None,
    validation_data: str | Path | None = None,
    image: starter.ImageChoices = starter.ImageChoices(),
    schema: str | None = None,
    overwrite: bool = False,
) -> InitResult:
    """Write a starter recipe for `model_path` (and the JSON Schema beside it unless `schema` names one).

    With `data_dir`, the recipe's int8 model (placed on placeholder ranges) is timed against float on its
    first sample; measured above 0.9x float, the recipe's comments and the warnings say that its
    max_latency_ratio gate will likely fail here (the gate stays: a model slower than float is no model to ship).
    The written text is checked to load as a recipe before anything is written; an `image` value
    data.images would refuse is a UsageError naming its option (`--std 0`) first.
    """
    model_path, output = Path(model_path), Path(output)
    if image is not None:
        image.check()
    data = Path(data_dir) if data_dir is not None else None
    evaluation = Path(validation_data) if validation_data is not None else None
    for folder in (data, evaluation):
        if folder is not None and not folder.exists():
            raise UsageError(f"{folder}: no such data folder or file")
    check_output_file(output, model_path, (data, evaluation), what="recipe file", overwrite=overwrite)
    schema_path = output.parent / starter.SCHEMA_FILE if schema is None else None
    if schema_path is not None:
        check_output_file(schema_path, model_path, (data, evaluation), what="schema file", overwrite=overwrite,
                          ours=("qtool recipe schema", _is_qtool_schema))
    model = load_model(model_path)
    text = starter.starter_recipe(model, model_path, output, data, evaluation,
                                  schema or starter.SCHEMA_FILE, image)
    recipe = parse_recipe(text, output)  # what we write must load as it is; a RecipeError here names the key
    latency, unmeasured = _probe_latency(model_path, recipe, data) if data is not None else (None, "")
    slow = None
    if latency is not None and latency.ratio > starter.LATENCY_MARGIN:  # the gate would fail, or flap
        slow = starter.MeasuredLatency(latency.ratio, latency.reference.median_ms, latency.candidate.median_ms,
                                       latency.candidate.runs)
        text = starter.starter_recipe(model, model_path, output, data, evaluation,
                                      schema or starter.SCHEMA_FILE, image, slow)
        parse_recipe(text, output)
    with guarded(output.parent, "create the folder"):
        output.parent.mkdir(parents=True, exist_ok=True)
    if schema_path is not None:
        write_text_atomic(schema_path, json.dumps(recipe_json_schema(), indent=2) + "\n")
    write_text_atomic(output, text)
    warnings = [slow.warning()] if slow else []
    if unmeasured:
        warnings.append(f"could not time the recipe's int8 model against float on the first sample of {data} "
                        f"(so its max_latency_ratio gate is unchecked here, and quantize may fail the same way): "
                        f"{unmeasured}")
    return InitResult(output, schema_path, latency.ratio if latency else None, warnings)


def _probe_latency(model_path: Path, recipe: Recipe, data: Path) -> tuple[BenchResult | None, str]:
    """The starter recipe's model against float on the first sample of `data`, as quantize times them
    (interleaved, one thread), its plan placed on placeholder ranges (what ORT runs depends on the graph,
    not the ranges); else (None, why): the data cannot be read as the recipe says, or ONNX Runtime
    refused to run the model on it (its message, first line)."""
    try:
        model, _ = prepare(model_path, recipe)
        feeds = next(open_data(data, _inputs(model, model_path), 1, recipe).batches(1)).feeds
        quantized = preview_plan(model, recipe, select_tensors(model, recipe), int8_kernels_may_saturate()).model
        return bench_models(model, quantized, feeds, threads=BENCH_THREADS, rounds=LATENCY_PROBE_ROUNDS,
                            max_seconds=2.0), ""
    except StopIteration:
        return None, "the data holds no sample"
    except QtoolError as exc:
        return None, str(exc)
    except Exception as exc:  # ORT's own Fail/InvalidArgument/... on this sample
        return None, f"ONNX Runtime: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"


def _is_qtool_schema(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("title") == "qtool recipe"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class CalibrateResult:
    table: CalibrationTable
    document: dict  # the table file's content
    output: Path | None


@in_scratch  # past 2 GB: the weights' work files go when it returns
def calibrate(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    format: str = "qtool",
    executor: str = "local",
    ray_address: str | None = None,
) -> CalibrateResult:
    """load → prepare → calibrate the tensors `recipe` would quantize; write the table to `output`.

    The table (JSON, `format: qtool-calibration`) is what `quantize(..., calibration=...)` reads
    instead of calibration data. It is written atomically; an existing file needs `overwrite`.
    `format`: `trt-cache` writes TensorRT's calibration cache instead, `ort-table` a folder with
    ONNX Runtime's TensorRT-EP table (calibration.json, .flatbuffers, .cache).
    `executor` "ray" shards the data over Ray tasks (`ray_address`, default RAY_ADDRESS, else a
    local instance); the table is byte-identical to this process's (docs/scale-out.md).
    """
    model_path = Path(model_path)
    if format not in interchange.FORMATS:
        raise UsageError(f"calibration format {format!r}: allowed: {', '.join(interchange.FORMATS)}")
    refuse_past_limit(model_path, executor)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output) if output is not None else None
    read_paths = (_path_or_none(data_dir), *recipe_inputs(recipe))
    if output is not None and format == "ort-table":
        check_output_path(output, model_path, overwrite, read_paths)
    elif output is not None:
        check_output_file(output, model_path, read_paths, what="calibration table", overwrite=overwrite)
    model, _ = prepare(model_path, recipe)
    data = open_data(data_dir, _inputs(model, model_path), recipe.calibration.samples, recipe)
    selection = select_tensors(model, recipe)
    table = _measure_ranges(model, recipe, selection, data, stage_progress(progress)("calibrate"),
                            executor, ray_address, hessians=False)
    table = replace(table, notes=[*data.notes, *table.notes])  # files resampled or not read: the CLI says so
    document = table_document(
        table, model_path=model_path, model_sha256=file_sha256(model_path), data=data,
        recipe={"path": str(recipe.source) if recipe.source else None, "resolved": recipe.as_dict()},
        qtool_version=__version__,
    )
    if output is not None and format == "qtool":
        save_table(document, output)
    elif output is not None:
        interchange.save_foreign(table, format, output, overwrite)
    return CalibrateResult(table, document, output)


def _measure_ranges(model: ModelProto, recipe: Recipe, selection, data, progress, executor: str = "local",
                    ray_address: str | None = None, hessians: bool = True) -> CalibrationTable:
    """The recipe's calibration of the selected tensors, here or sharded on Ray (`executor`); `auto`
    then picks the ranges among its candidates (qtool.evaluation.method_choice).
    `hessians`: also E[x xᵀ] for gptq rounding (quantize needs them; a table file never holds them)."""
    act = recipe.quantization.activations
    table = calibrate_with(executor, ray_address, model, selection.calibration_tensors, data, recipe.calibration,
                           QTYPES[act.dtype], act.symmetric, progress, selection.hessian_inputs if hessians else None)
    if recipe.calibration.method == "auto":
        return choose_method(model, recipe, selection, table, int8_kernels_may_saturate(), data)
    return table


def recipe_inputs(recipe: Recipe) -> tuple[Path | None, ...]:
    """The files a recipe reads: itself and its `base:` files, its validation data and labels, its
    tokenizer and initial state (none may be written over)."""
    data = recipe.data
    return (*recipe.files, recipe.resolve_path(recipe.validation.data), recipe.resolve_path(recipe.validation.labels),
            recipe.resolve_path(data.text.tokenizer) if data.text else None,
            recipe.resolve_path(data.state.initial) if data.state else None)


def _table_warnings(table: CalibrationTable, recipe: Recipe) -> list[str]:
    """What the table's recorded making differs in from this recipe (see `recipe_differences`)."""
    if table.provenance.get("format") in ("trt-cache", "ort-table"):
        return [f"calibration ranges imported from {table.provenance['format']} {table.provenance['file']}: "
                "not checked against this model file"
                + (", symmetric [-amax, amax]" if table.provenance["format"] == "trt-cache" else "")]
    return recipe_differences(table, recipe)


def uses_dynamic(recipe: Recipe) -> bool:
    """Whether any node may be quantized dynamically (then calibration data is optional)."""
    quant = recipe.quantization
    return quant.mode == "dynamic" or any(o.mode == "dynamic" for o in quant.overrides)


@in_scratch  # past 2 GB: the weights' work files go when it returns
def quantize(
    model_path: str | Path,
    data_dir: str | Path | None,
    recipe: Recipe | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    validation_data: str | Path | None = None,
    labels: str | Path | None = None,
    calibration: str | Path | None = None,
    overwrite: bool = False,
    per_layer: bool = False,
    bench: bool = False,
    threads: int | None = None,
    junit: str | Path | None = None,
    step_summary: str | Path | None = None,
    progress: Progress | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> QuantizeResult:
    """Calibrate, quantize and validate one model; write artifacts if `output_dir` is given.

    `validation_data` and `labels` override the recipe's `validation.data`/`labels`.
    `bench` (or a `max_latency_ratio` gate) times float and quantized interleaved on `threads`
    ONNX Runtime threads (default 1); a quantized model slower than float adds a warning.
    With `calibration` (a table written by `calibrate`) no calibration data is read:
    `data_dir` must then be None, and validation data must come from `validation_data`
    or the recipe. A recipe with `quantization.mode: dynamic` needs no calibration data
    either (`data_dir` None; given, it serves smoothing and, failing other validation data,
    validation); a UsageError (exit 2) says so when overrides make nodes static.
    `executor` "ray" shards calibration over Ray tasks, as in `calibrate`.
    """
    if calibration is not None and data_dir is not None:
        raise UsageError("give calibration data (--data) or a calibration table (--calibration), not both")
    model_path = Path(model_path)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if calibration is None and data_dir is None and not uses_dynamic(recipe):
        raise UsageError("calibration data (--data DIR) or a calibration table (--calibration TABLE.json) is needed")
    output = Path(output_dir) if output_dir is not None else None
    read_paths = (_path_or_none(data_dir), validation_data, labels, calibration, *recipe_inputs(recipe))
    if output is not None:
        check_output_path(output, model_path, overwrite, read_paths)
    check_ci_files(junit, step_summary, model_path, read_paths, overwrite)
    if calibration is None and data_dir is not None:  # calibration would run on Ray
        refuse_past_limit(model_path, executor)
    tick = stage_progress(progress)
    loaded = interchange.load_any_table(calibration) if calibration is not None else None

    read = fingerprint(model_path)  # the report names the model loaded, whatever happens to the file later
    model, prepare_notes, equalized = _prepare(model_path, recipe)
    read = as_loaded(model_path, read)
    inputs = _inputs(model, model_path)
    unmeasurable = unmeasurable_gates(recipe.validation.gates, model)
    if unmeasurable:
        raise RecipeError(f"{recipe.source or 'recipe'}: validation.gates: {model_path.name}: {unmeasurable}")
    calib_data = None if data_dir is None else open_data(data_dir, inputs, recipe.calibration.samples, recipe)
    eval_data, eval_labels, warnings = resolve_validation_data(recipe, calib_data, inputs, validation_data, labels)
    check_gates_are_measurable(recipe, eval_labels)

    smoothed = None
    if recipe.quantization.algorithms.smoothing and calib_data is None:
        warnings.append("quantization.algorithms.smoothing needs calibration data (--data), "
                        "not a calibration table: skipped")
    elif recipe.quantization.algorithms.smoothing:
        model, smoothed = smooth(model, calib_data, recipe.calibration.batch_size)
    selection = select_tensors(model, recipe)
    outliers = None
    if recipe.quantization.algorithms.outliers == "auto" and calib_data is not None and loaded is None:
        model, outliers = handle_outliers(model, selection, calib_data, recipe.calibration.batch_size,
                                          recipe.calibration)
        if outliers.tensors:
            selection = select_tensors(model, recipe, outliers.keep_float)
    if loaded is None and calib_data is None:  # mode dynamic: no ranges, unless overrides make nodes static
        if selection.calibration_tensors:
            raise UsageError(f"{len(selection.calibration_tensors)} tensor(s) the recipe quantizes statically "
                             f"(e.g. {selection.calibration_tensors[0]}) need calibration data (--data DIR) or a "
                             "calibration table (--calibration TABLE.json); mode dynamic alone needs neither")
        table = CalibrationTable({}, 0)
    elif loaded is not None:
        check_table(loaded, read.sha256, selection.calibration_tensors)
        table = loaded
        warnings += _table_warnings(loaded, recipe)
    else:
        table = _measure_ranges(model, recipe, selection, calib_data, tick("calibrate"), executor, ray_address)
        # which method calibration.method auto chose is a note (the report's calibration.note), as calibrate prints it
        warnings += table.notes[:-1] if table.method_choice else table.notes
    saturating = int8_kernels_may_saturate()
    shape_data = calib_data if calib_data is not None else eval_data
    if recipe.quantization.placement == "fast" and shape_data is not None:  # what placement estimates costs from
        table = replace(table, shapes=tensor_shapes(model, next(shape_data.batches(1)).feeds))
    placed = plan_and_apply(model, recipe, selection, table, saturating)
    ends: FloatEndsOutcome | None = None
    if recipe.quantization.algorithms.keep_float == "auto" and calib_data is not None and loaded is None:
        selection, placed, ends = choose_float_ends(model, recipe, selection, table, saturating, placed, calib_data)
    plan, quantized = placed.plan, placed.model
    ranges_from = Path(calibration) if calibration else calib_data.folder if calib_data else "(no calibration data)"
    warnings += check_coverage(plan, sum(d.quantized for d in selection.nodes), model=model_path,
                               recipe=recipe.source, ranges_from=ranges_from, table=calibration is not None)
    corrected: BiasOutcome | None = None
    if recipe.quantization.algorithms.bias_correction and calib_data is not None:
        plan, quantized, corrected = correct_bias(model, recipe, selection, table, saturating, plan, quantized,
                                                  calib_data)
    elif "bias_correction" in recipe.quantization.algorithms.model_fields_set and calib_data is None:
        warnings.append(NO_DATA)  # asked for in so many words; the default is skipped with a note only
    copy_metadata(model, quantized)
    optimized = optimized_graph(quantized)  # one session: the kernels section and the warning below read it
    warnings += unmatched_overrides(model.graph, recipe.quantization) + float_nodes_on_integer_kernels(optimized, plan)
    simulated = compare_models(model, quantized, eval_data, labels=eval_labels,  # first: lower peak past 2 GB
                               batch_size=recipe.calibration.batch_size, optimize_candidate=False)
    comparison = compare_models(model, quantized, eval_data, labels=eval_labels,
                                batch_size=recipe.calibration.batch_size, progress=tick("validate"))
    warnings += accuracy_warnings(comparison, eval_labels)
    layers, latency = layers_and_latency(
        model, quantized, eval_data, recipe.calibration.batch_size, per_layer,
        bench or "max_latency_ratio" in recipe.validation.gates, threads or BENCH_THREADS, tick,
        {decision.node: decision.reason for decision in plan.nodes})
    warnings += slower_than_float(latency)
    quantized_bytes = proto_size(quantized)  # serializes the model: once
    gates = check_gates(comparison, recipe.validation.gates, extra_figures(read.bytes, quantized_bytes, latency))
    ops = op_histogram(optimized)
    warnings += kernel_warnings(comparison, simulated, kernel_gap_cause(quantized, ops, saturating))

    report = reporting.build_quantize_report(
        model_path=model_path, model_sha256=read.sha256, recipe=recipe,
        calib_data=calib_data, eval_data=eval_data, prepare_notes=prepare_notes,
        table=table, plan=plan, saturating_host=saturating,
        float_bytes=read.bytes, quantized_bytes=quantized_bytes,
        integer_ops={op: n for op, n in sorted(ops.items()) if op in INTEGER_OP_TYPES},
        optimized_ops=dict(sorted(ops.items())),
        comparison=comparison, simulated=simulated, gates=gates, warnings=warnings,
        layers=layers, latency=latency, algorithms=algorithms_section(recipe, equalized, smoothed, corrected,
                                                                             outliers, ends),
    )
    if output is not None:
        write_artifacts(output, overwrite, {
            "model.onnx": lambda path: save_model(quantized, path),
            **report_writers(report),
        })
    result = QuantizeResult(into_memory(quantized), report, gates)  # past 2 GB its weights were on disk
    _write_ci_files(result, junit, step_summary, output)
    return result


def _write_ci_files(result, junit, step_summary, output: Path | None) -> None:
    """write_ci_files; a SideFileError carries `result`, whose gates and warnings the CLI still prints."""
    try:
        write_ci_files(result.report, junit, step_summary, output)
    except SideFileError as exc:
        raise SideFileError(str(exc), result) from None


@dataclass(frozen=True)
class CompareResult:
    report: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


@in_scratch  # past 2 GB: the weights' work files go when it returns
def compare(
    reference_path: str | Path,
    candidate_path: str | Path,
    data_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    labels: str | Path | None = None,
    recipe: Recipe | str | Path | None = None,
    gates: dict[str, float] | None = None,
    per_layer: bool = False,
    bench: bool = False,
    threads: int | None = None,
    junit: str | Path | None = None,
    step_summary: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CompareResult:
    """Validate `candidate` (usually quantized) against `reference` on the same inputs; write a report.

    `gates` override the recipe's `validation.gates`. `bench` times both models as `quantize` does
    (interleaved, `threads` ONNX Runtime threads, default 1). A float reference goes
    through the same preparation as in `quantize` (function-preserving), so
    per-layer matching sees the graph the candidate was made from.
    """
    reference_path, candidate_path, data_dir = Path(reference_path), Path(candidate_path), Path(data_dir)
    recipe_given = recipe is not None
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    wanted = {**recipe.validation.gates, **(gates or {})}
    unknown = sorted(set(wanted) - set(GATES))
    if unknown:
        raise UsageError(f"unknown gate {', '.join(unknown)}; allowed: {', '.join(GATES)}")
    for name, threshold in (gates or {}).items():
        if gate_problem(name, threshold):
            raise UsageError(f"gate {name}={threshold}: {gate_problem(name, threshold)}")
    output = Path(output_dir) if output_dir is not None else None
    read_paths = (candidate_path, data_dir, labels, *recipe_inputs(recipe))
    if output is not None:
        check_output_path(output, reference_path, overwrite, read_paths)
    check_ci_files(junit, step_summary, reference_path, read_paths, overwrite)
    tick = stage_progress(progress)

    reference = load_model(reference_path, allow_quantized=True)
    if not any(node.op_type in QUANTIZED_OP_TYPES for node in reference.graph.node):
        reference, _ = prepare(reference_path)
    else:
        check_runnable(reference, reference_path)
    candidate = load_model(candidate_path, allow_quantized=True)
    check_runnable(candidate, candidate_path)
    inputs = model_inputs(reference)
    candidate_inputs = {spec.name for spec in model_inputs(candidate)}
    if candidate_inputs != {spec.name for spec in inputs}:
        raise ModelError(f"{candidate_path}: inputs {sorted(candidate_inputs)} differ from the reference's "
                         f"{sorted(spec.name for spec in inputs)}")
    unmeasurable = unmeasurable_gates(wanted, reference)
    if unmeasurable:
        raise UsageError(f"gates: {reference_path.name}: {unmeasurable}")
    data = open_data(data_dir, inputs, recipe.validation.samples, recipe)
    labels_path = Path(labels) if labels else data.folder / "labels.txt"
    if labels and not labels_path.is_file():
        raise UsageError(f"{labels_path}: no such labels file")
    truth = read_labels(labels_path) if labels_path.is_file() else data.class_labels
    if "max_accuracy_drop" in wanted and not truth:
        raise UsageError("gate max_accuracy_drop needs labels: pass --labels or put labels.txt in the data folder")

    batch_size = recipe.calibration.batch_size
    comparison = compare_models(reference, candidate, data, labels=truth, batch_size=batch_size,
                                progress=tick("validate"))
    layers, latency = layers_and_latency(reference, candidate, data, batch_size, per_layer,
                                         bench or "max_latency_ratio" in wanted, threads or BENCH_THREADS, tick)
    reference_bytes, candidate_bytes = model_file_bytes(reference_path), model_file_bytes(candidate_path)
    results = check_gates(comparison, wanted, extra_figures(reference_bytes, candidate_bytes, latency))
    report = reporting.build_compare_report(
        reference_path=reference_path, candidate_path=candidate_path, recipe=recipe if recipe_given else None,
        data=data, labels_path=labels_path if labels_path.is_file() else None,
        reference_bytes=reference_bytes, candidate_bytes=candidate_bytes, comparison=comparison,
        gates=results, layers=layers, latency=latency,
        warnings=accuracy_warnings(comparison, truth) + slower_than_float(latency, compared=True),
    )
    if output is not None:
        write_artifacts(output, overwrite, report_writers(report))
    result = CompareResult(report, results)
    _write_ci_files(result, junit, step_summary, output)
    return result


def _inputs(model: ModelProto, model_path: Path):
    """The model's inputs; a model without any has nothing for data to feed."""
    inputs = model_inputs(model)
    if not inputs:
        raise ModelError(f"{model_path}: the model has no inputs (every value is computed inside it): "
                         "there is nothing for calibration data to feed")
    return inputs


def _path_or_none(data) -> Path | None:
    """The file or folder `data` is read from (a --data-loader's .py file too), else None."""
    if isinstance(data, Loader):
        return data.path
    return Path(data) if isinstance(data, (str, Path)) else None


def stage_progress(progress: Progress | None):
    def for_stage(stage: str):
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)
    return for_stage
