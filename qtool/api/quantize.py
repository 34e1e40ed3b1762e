"""`qtool quantize`: calibrate (or read a table), plan, insert Q/DQ, validate, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnx import ModelProto

from qtool.calibration import interchange
from qtool.calibration.calibrate import CalibrationTable
from qtool.calibration.clipping import clipping_warnings
from qtool.calibration.table_file import check_table, recipe_differences
from qtool.distributed.ray_executor import refuse_past_limit
from qtool.errors import RecipeError, UsageError
from qtool.evaluation.bias_choice import BiasOutcome, correct_bias
from qtool.evaluation.float_choice import FloatEndsOutcome, choose_float_ends
from qtool.evaluation.compare import GateResult, check_gates, compare_models
from qtool.evaluation.validation import (accuracy_warnings, check_gates_are_measurable, extra_figures,
                                         kernel_gap_cause, kernel_warnings, layers_and_latency,
                                         resolve_validation_data, slower_than_float, tie_warnings,
                                         unmeasurable_gates)
from qtool.io.artifacts import write_artifacts
from qtool.io.external import in_scratch
from qtool.io.feeds import open_data
from qtool.io.fingerprint import as_loaded, fingerprint
from qtool.io.targets import check_output_path
from qtool.io.model import copy_metadata, proto_size, save_model, into_memory
from qtool.quantization.algorithms.bias_correction import NO_DATA
from qtool.quantization.algorithms.outliers import handle_outliers
from qtool.quantization.algorithms.smoothing import smooth
from qtool.quantization.coverage import check_coverage
from qtool.quantization.placement import float_nodes_on_integer_kernels, plan_and_apply, with_fast_shapes
from qtool.quantization.precedence import unmatched_overrides
from qtool.quantization.plan import select_tensors
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe
from qtool.reporting import document as reporting
from qtool.reporting.algorithms import algorithms_section
from qtool.reporting.files import check_ci_files, report_writers
from qtool.runtime.session import INTEGER_OP_TYPES, int8_kernels_may_saturate, op_histogram, optimized_graph

from qtool.api.calibrate import measure_ranges
from qtool.api.common import (Progress, bench_threads, data_inputs, path_or_none, prepare_with_pairs, recipe_inputs,
                              stage_progress, write_ci_files_of)

@dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    report: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)



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
    threads = bench_threads(threads)
    output = Path(output_dir) if output_dir is not None else None
    read_paths = (path_or_none(data_dir), validation_data, labels, calibration, *recipe_inputs(recipe))
    if output is not None:
        check_output_path(output, model_path, overwrite, read_paths)
    check_ci_files(junit, step_summary, model_path, read_paths, overwrite)
    if calibration is None and data_dir is not None:  # calibration would run on Ray
        refuse_past_limit(model_path, executor)
    tick = stage_progress(progress)
    loaded = interchange.load_any_table(calibration) if calibration is not None else None

    read = fingerprint(model_path)  # the report names the model loaded, whatever happens to the file later
    model, prepare_notes, equalized = prepare_with_pairs(model_path, recipe)
    read = as_loaded(model_path, read)
    inputs = data_inputs(model, model_path)
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
        table = measure_ranges(model, recipe, selection, calib_data, tick("calibrate"), executor, ray_address)
        # which method calibration.method auto chose is a note (the report's calibration.note), as calibrate prints it
        warnings += table.notes[:-1] if table.method_choice else table.notes
    warnings += clipping_warnings(table)  # entropy ranges that cut off over 1 % of a tensor's values
    saturating = int8_kernels_may_saturate()
    table = with_fast_shapes(model, recipe, table, calib_data if calib_data is not None else eval_data)
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
    elif (recipe.quantization.algorithms.bias_correction and calib_data is None
          and "bias_correction" in recipe.quantization.algorithms.model_fields_set):
        warnings.append(NO_DATA)  # asked for in so many words; the default is skipped with a note only
    copy_metadata(model, quantized)
    optimized = optimized_graph(quantized)  # one session: the kernels section and the warning below read it
    warnings += unmatched_overrides(model.graph, recipe.quantization) + float_nodes_on_integer_kernels(optimized, plan)
    simulated = compare_models(model, quantized, eval_data, labels=eval_labels,  # first: lower peak past 2 GB
                               batch_size=recipe.calibration.batch_size, optimize_candidate=False)
    comparison = compare_models(model, quantized, eval_data, labels=eval_labels,
                                batch_size=recipe.calibration.batch_size, progress=tick("validate"))
    warnings += accuracy_warnings(comparison, eval_labels) + tie_warnings(comparison)
    layers, latency = layers_and_latency(
        model, quantized, eval_data, recipe.calibration.batch_size, per_layer,
        bench or "max_latency_ratio" in recipe.validation.gates, threads, tick,
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
    write_ci_files_of(result, junit, step_summary, output)
    return result
