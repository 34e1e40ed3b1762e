"""The use cases as plain functions: the only orchestrator and the only writer of artifacts.

The CLI calls these; so can any Python program (`import qtool`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from onnx import ModelProto

from qtool import inspection, starter
from qtool import report as reporting
from qtool import __version__
from qtool.calibrate import CalibrationTable, check_table, load_table, save_table, table_document
from qtool.calibrate import calibrate as calibrate_tensors
from qtool.bench import bench_models
from qtool.compare import GATES, Comparison, GateResult, check_gates, compare_models
from qtool.data import DataFolder, model_inputs, read_labels
from qtool.errors import ModelError, RecipeError, UsageError
from qtool.html_report import render_html
from qtool.layers import layer_errors, weight_errors
from qtool.model import (QUANTIZED_OP_TYPES, file_sha256, load_model, model_file_bytes, opset_version, proto_size,
                         save_model, upgrade_opset)
from qtool.numerics import QTYPES
from qtool.plan import build_plan, required_opset, select_tensors
from qtool.prepare import prepare_model
from qtool.qdq import apply_plan, ensure_opset
from qtool.recipe import Recipe, load_recipe, parse_recipe, recipe_json_schema
from qtool.runner import INTEGER_OP_TYPES, check_runnable, int8_kernels_may_saturate, optimized_op_histogram
from qtool.executor import Executor, make_executor
from qtool.runner import make_session, run
from qtool.search_report import search_report_writers
from qtool.sensitivity import (A16, FLOAT_MODEL, SEARCH_GATES, TrialContext, TrialResult, TrialSpec, build_trial_model,
                               cache_key, float_model_name, promotion_overrides, rank_nodes, run_trial,
                               with_overrides, worst, write_eval_set)
from qtool.tune import Search, objective, objective_name, pareto_frontier

# progress(stage, done, total): the CLI renders it; nothing below the CLI prints.
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    report: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


def prepare(model_path: Path, recipe: Recipe | None = None) -> tuple[ModelProto, list[str]]:
    """load → opset upgrade → graph clean-up → the opset the recipe's types need; returns
    the model and what was done."""
    model = load_model(model_path)
    check_runnable(model, model_path)
    model, upgrade_note = upgrade_opset(model, model_path)
    model, notes = prepare_model(model)
    model, opset_note = ensure_opset(model, required_opset(recipe)) if recipe else (model, None)
    return model, [note for note in [upgrade_note, *notes, opset_note] if note]


def inspect(model_path: str | Path, recipe: Recipe | str | Path | None = None) -> inspection.Inspection:
    """What a model is and what qtool would do to it under `recipe`.

    Problems qtool would refuse or change later are listed, not raised; only
    a file that is not a readable ONNX model is an error.
    """
    model_path = Path(model_path)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    header = inspection.read_header(model_path)
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
        else:
            decisions = select_tensors(model, recipe).nodes
    opset = inspection.opset_problem(opset_version(header), upgraded)
    return inspection.describe_model(
        header, model_path, ([opset] if opset else []) + problems, prepare_notes=notes,
        recipe=str(recipe.source) if recipe.source else "built-in default", decisions=decisions,
    )


def init_recipe(
    model_path: str | Path,
    output: str | Path,
    *,
    data_dir: str | Path | None = None,
    validation_data: str | Path | None = None,
    image: starter.ImageChoices = starter.ImageChoices(),
    schema: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path | None]:
    """Write a starter recipe for `model_path` (and the JSON Schema beside it unless `schema` names one).

    Returns the recipe's path and the schema file written (None when `schema` was given).
    The written text is checked to load as a recipe before anything is written.
    """
    model_path, output = Path(model_path), Path(output)
    data = Path(data_dir) if data_dir is not None else None
    evaluation = Path(validation_data) if validation_data is not None else None
    for folder in (data, evaluation):
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{folder}: no such data folder")
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: exists; pass --overwrite to replace it")
    schema_path = output.parent / starter.SCHEMA_FILE if schema is None else None
    if schema_path is not None and schema_path.exists() and not overwrite and not _is_qtool_schema(schema_path):
        raise UsageError(f"{schema_path}: exists and is not a qtool recipe schema; pass --overwrite to replace it")
    model = load_model(model_path)
    text = starter.starter_recipe(model, model_path, output, data, evaluation,
                                  schema or starter.SCHEMA_FILE, image)
    parse_recipe(text, output)  # what we write must load as it is; a RecipeError here names the key
    output.parent.mkdir(parents=True, exist_ok=True)
    if schema_path is not None:
        _write_text_atomic(schema_path, json.dumps(recipe_json_schema(), indent=2) + "\n")
    _write_text_atomic(output, text)
    return output, schema_path


def _is_qtool_schema(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("title") == "qtool recipe"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.qtool-tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


@dataclass(frozen=True)
class CalibrateResult:
    table: CalibrationTable
    document: dict  # the table file's content
    output: Path | None


def calibrate(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CalibrateResult:
    """load → prepare → calibrate the tensors `recipe` would quantize; write the table to `output`.

    The table (JSON, `format: qtool-calibration`) is what `quantize(..., calibration=...)` reads
    instead of calibration data. It is written atomically; an existing file needs `overwrite`.
    """
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output) if output is not None else None
    if output is not None:
        _check_table_output(output, model_path, overwrite)
    model, _ = prepare(model_path, recipe)
    data = DataFolder(data_dir, model_inputs(model), recipe.calibration.samples,
                      images=recipe.data.images if recipe.data else None)
    selection = select_tensors(model, recipe)
    act = recipe.quantization.activations
    table = calibrate_tensors(model, selection.calibration_tensors, data, recipe.calibration,
                              QTYPES[act.dtype], act.symmetric, _stage_progress(progress)("calibrate"))
    document = table_document(
        table, model_path=model_path, model_sha256=file_sha256(model_path), data=data,
        recipe={"path": str(recipe.source) if recipe.source else None, "resolved": recipe.as_dict()},
        qtool_version=__version__,
    )
    if output is not None:
        save_table(document, output)
    return CalibrateResult(table, document, output)


def _check_table_output(output: Path, model_path: Path, overwrite: bool) -> None:
    if output.resolve() == model_path.resolve():
        raise UsageError(f"{output}: would overwrite the input model; choose another output file")
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; give the calibration table's file name (e.g. table.json)")
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: file exists; pass --overwrite to replace it")


def _table_warnings(table: CalibrationTable, recipe: Recipe) -> list[str]:
    """Entropy and mse ranges depend on the activation type: say so if the table's differs."""
    made_with = ((table.provenance.get("recipe") or {}).get("resolved") or {}).get("quantization", {})
    then, now = made_with.get("activations"), recipe.as_dict()["quantization"]["activations"]
    if then is not None and then != now:
        return [f"calibration table {table.provenance.get('file')} was made for activations {then}, "
                f"this recipe quantizes them as {now}"]
    return []


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
) -> QuantizeResult:
    """Calibrate, quantize and validate one model; write artifacts if `output_dir` is given.

    `validation_data` and `labels` override the recipe's `validation.data`/`labels`.
    With `calibration` (a table written by `calibrate`) no calibration data is read:
    `data_dir` must then be None, and validation data must come from `validation_data`
    or the recipe.
    """
    if calibration is not None and data_dir is not None:
        raise UsageError("give calibration data (--data) or a calibration table (--calibration), not both")
    if calibration is None and data_dir is None:
        raise UsageError("calibration data (--data DIR) or a calibration table (--calibration TABLE.json) "
                         "is needed")
    model_path = Path(model_path)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        check_output_path(output, model_path, overwrite,
                          (data_dir, validation_data, labels, recipe.source, calibration))
    tick = _stage_progress(progress)
    loaded = load_table(calibration) if calibration is not None else None

    model, prepare_notes = prepare(model_path, recipe)
    inputs = model_inputs(model)
    calib_data = None if data_dir is None else DataFolder(
        Path(data_dir), inputs, recipe.calibration.samples, images=recipe.data.images if recipe.data else None)
    eval_data, eval_labels, warnings = _validation_data(recipe, calib_data, inputs, validation_data, labels)
    _check_gates_are_measurable(recipe, eval_labels)

    selection = select_tensors(model, recipe)
    act = recipe.quantization.activations
    if loaded is not None:
        check_table(loaded, file_sha256(model_path), selection.calibration_tensors)
        table = loaded
        warnings += _table_warnings(loaded, recipe)
    else:
        table = calibrate_tensors(model, selection.calibration_tensors, calib_data, recipe.calibration,
                                  QTYPES[act.dtype], act.symmetric, tick("calibrate"))
    saturating = int8_kernels_may_saturate()
    plan = build_plan(model, recipe, selection, table, saturating)
    quantized = apply_plan(model, plan)
    for key, value in _float_metadata(model).items():
        _set_metadata(quantized, key, value)

    comparison = compare_models(model, quantized, eval_data, labels=eval_labels,
                                batch_size=recipe.calibration.batch_size, progress=tick("validate"))
    simulated = compare_models(model, quantized, eval_data, labels=eval_labels,
                               batch_size=recipe.calibration.batch_size, optimize_candidate=False)
    layers, latency = _layers_and_latency(
        model, quantized, eval_data, recipe.calibration.batch_size, per_layer,
        bench or "max_latency_ratio" in recipe.validation.gates, threads, tick,
        {decision.node: decision.reason for decision in plan.nodes})
    gates = check_gates(comparison, recipe.validation.gates,
                        _extra_figures(model_file_bytes(model_path), proto_size(quantized), latency))
    warnings += _kernel_warnings(comparison, simulated)
    ops = optimized_op_histogram(quantized)

    report = reporting.build_quantize_report(
        model_path=model_path, model_sha256=file_sha256(model_path), recipe=recipe,
        calib_data=calib_data, eval_data=eval_data, prepare_notes=prepare_notes,
        table=table, plan=plan, saturating_host=saturating,
        float_bytes=model_file_bytes(model_path), quantized_bytes=proto_size(quantized),
        integer_ops={op: n for op, n in sorted(ops.items()) if op in INTEGER_OP_TYPES},
        optimized_ops=dict(sorted(ops.items())),
        comparison=comparison, simulated=simulated, gates=gates, warnings=warnings,
        layers=layers, latency=latency,
    )
    if output is not None:
        write_artifacts(output, overwrite, {
            "model.onnx": lambda path: save_model(quantized, path),
            **_report_writers(report),
        })
    write_ci_files(report, junit, step_summary)
    return QuantizeResult(quantized, report, gates)


@dataclass(frozen=True)
class CompareResult:
    report: dict
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


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

    `gates` override the recipe's `validation.gates`. A float reference goes
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
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        check_output_path(output, reference_path, overwrite, (candidate_path, data_dir, labels, recipe.source))
    tick = _stage_progress(progress)

    reference = load_model(reference_path, allow_quantized=True)
    if not any(node.op_type in QUANTIZED_OP_TYPES for node in reference.graph.node):
        reference, _ = prepare(reference_path)
    candidate = load_model(candidate_path, allow_quantized=True)
    inputs = model_inputs(reference)
    candidate_inputs = {spec.name for spec in model_inputs(candidate)}
    if candidate_inputs != {spec.name for spec in inputs}:
        raise ModelError(f"{candidate_path}: inputs {sorted(candidate_inputs)} differ from the reference's "
                         f"{sorted(spec.name for spec in inputs)}")
    data = DataFolder(data_dir, inputs, recipe.validation.samples, images=recipe.data.images if recipe.data else None)
    labels_path = Path(labels) if labels else data.folder / "labels.txt"
    if labels and not labels_path.is_file():
        raise UsageError(f"{labels_path}: no such labels file")
    truth = read_labels(labels_path) if labels_path.is_file() else data.class_labels
    if "max_accuracy_drop" in wanted and not truth:
        raise UsageError("gate max_accuracy_drop needs labels: pass --labels or put labels.txt in the data folder")

    batch_size = recipe.calibration.batch_size
    comparison = compare_models(reference, candidate, data, labels=truth, batch_size=batch_size,
                                progress=tick("validate"))
    layers, latency = _layers_and_latency(reference, candidate, data, batch_size, per_layer,
                                          bench or "max_latency_ratio" in wanted, threads, tick)
    reference_bytes, candidate_bytes = model_file_bytes(reference_path), model_file_bytes(candidate_path)
    results = check_gates(comparison, wanted, _extra_figures(reference_bytes, candidate_bytes, latency))
    report = reporting.build_compare_report(
        reference_path=reference_path, candidate_path=candidate_path, recipe=recipe if recipe_given else None,
        data=data, labels_path=labels_path if labels_path.is_file() else None,
        reference_bytes=reference_bytes, candidate_bytes=candidate_bytes, comparison=comparison,
        gates=results, layers=layers, latency=latency,
    )
    if output is not None:
        write_artifacts(output, overwrite, _report_writers(report))
    write_ci_files(report, junit, step_summary)
    return CompareResult(report, results)


def _layers_and_latency(reference: ModelProto, candidate: ModelProto, data: DataFolder, batch_size: int,
                        per_layer: bool, bench: bool, threads: int | None, tick,
                        reasons: dict[str, str] | None = None) -> tuple[dict | None, dict | None]:
    layers = latency = None
    if per_layer:
        activations, unmatched = layer_errors(reference, candidate, data, batch_size=batch_size,
                                              progress=tick("per-layer"))
        layers = reporting.layers_section(activations, weight_errors(reference, candidate), unmatched, reasons)
    if bench:
        feeds = next(data.batches(1)).feeds
        latency = reporting.latency_section(bench_models(reference, candidate, feeds, threads=threads))
    return layers, latency


def _extra_figures(reference_bytes: int, candidate_bytes: int, latency: dict | None) -> dict:
    return {"size_ratio": reference_bytes / candidate_bytes if candidate_bytes else None,
            "latency_ratio": latency["ratio"] if latency else None}


def _report_writers(report: dict) -> dict[str, Callable[[Path], None]]:
    return {
        "report.json": lambda path: path.write_text(reporting.render_json(report), encoding="utf-8"),
        "report.md": lambda path: path.write_text(reporting.render_markdown(report), encoding="utf-8"),
        "report.html": lambda path: path.write_text(render_html(report), encoding="utf-8"),
    }


def write_ci_files(report: dict, junit: str | Path | None, step_summary: str | Path | None) -> None:
    """The JUnit file (written whole, then renamed) and the Markdown appended to a CI step summary."""
    if junit is not None:
        junit = Path(junit)
        junit.parent.mkdir(parents=True, exist_ok=True)
        staging = junit.with_name(f".{junit.name}{STAGING_SUFFIX}")
        staging.write_text(reporting.render_junit(report), encoding="utf-8")
        staging.replace(junit)
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(reporting.render_markdown(report) + "\n")


def _stage_progress(progress: Progress | None):
    def for_stage(stage: str):
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)
    return for_stage


def _validation_data(
    recipe: Recipe, calib_data: DataFolder | None, inputs, data_override: str | Path | None,
    labels_override: str | Path | None,
) -> tuple[DataFolder, dict | None, list[str]]:
    spec = recipe.validation
    warnings = []
    folder_path = Path(data_override) if data_override else recipe.resolve_path(spec.data)
    if folder_path is not None:
        folder = DataFolder(folder_path, inputs, spec.samples, images=recipe.data.images if recipe.data else None)
    elif calib_data is None:
        raise UsageError("with --calibration no calibration data is read: give validation data with "
                         "--validation-data or the recipe's validation.data")
    else:
        folder = DataFolder(calib_data.folder, inputs, spec.samples, images=recipe.data.images if recipe.data else None)
        warnings.append("validation ran on the calibration data (no validation data given): "
                        "figures are optimistic")
    if labels_override:
        labels_path = Path(labels_override)
        if not labels_path.is_file():
            raise UsageError(f"{labels_path}: no such labels file")
    elif spec.labels:
        labels_path = recipe.resolve_path(spec.labels)
        if not labels_path.is_file():
            raise RecipeError(f"{recipe.source}: validation.labels: no such file {labels_path}")
    else:
        labels_path = folder.folder / "labels.txt"
    labels = read_labels(labels_path) if labels_path.is_file() else folder.class_labels
    return folder, labels, warnings


def _check_gates_are_measurable(recipe: Recipe, labels: dict | None) -> None:
    if "max_accuracy_drop" in recipe.validation.gates and not labels:
        raise RecipeError(
            f"{recipe.source}: validation.gates.max_accuracy_drop needs labels: set validation.labels "
            "or put labels.txt in the validation data folder"
        )


def _kernel_warnings(kernels: Comparison, simulated: Comparison) -> list[str]:
    """Flag integer kernels that lose accuracy the Q/DQ simulation does not (saturation)."""
    warnings = []
    for name, figures in kernels.outputs.items():
        sim = simulated.outputs[name]
        if sim["sqnr_db"] - figures["sqnr_db"] > 3.0:
            warnings.append(
                f"output {name}: integer kernels give SQNR {figures['sqnr_db']:.1f} dB against "
                f"{sim['sqnr_db']:.1f} dB simulated; int8 kernels may saturate on this CPU "
                "(try quantization.weights.reduce_range: true)"
            )
    return warnings


def _float_metadata(model: ModelProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


def _set_metadata(model: ModelProto, key: str, value: str) -> None:
    for entry in model.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    model.metadata_props.add(key=key, value=value)


def check_output_path(output: Path, model_path: Path, overwrite: bool, protected: tuple = ()) -> None:
    """The output folder may not be, or contain, the input model or any other input
    (`protected`: data folders, labels, recipe); an existing one needs --overwrite."""
    out = output.resolve()
    for given in (model_path, *(Path(p) for p in protected if p is not None)):
        source = given.resolve()
        if out == source or source.is_relative_to(out):
            what = "the input model" if given == model_path else "the input"
            raise UsageError(f"{output}: output folder would contain {what} {given}; choose another")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{output}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")


STAGING_SUFFIX = ".qtool-tmp"


def write_artifacts(output: Path, overwrite: bool, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every artifact into a temporary folder beside `output`, then rename it into place.

    A failure or an interrupt (KeyboardInterrupt, SystemExit) at any point
    leaves `output` as it was (absent, or the old folder) and no temporary
    folder behind: an old folder replaced with --overwrite is first moved
    aside, and only deleted once the new one is in place.
    """
    output = output.resolve()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=STAGING_SUFFIX, dir=output.parent))
    except OSError as exc:
        raise UsageError(f"{output}: cannot create the output folder: {exc.strerror or exc}") from None
    retired = staging.with_name(staging.name[: -len(STAGING_SUFFIX)] + ".old" + STAGING_SUFFIX)
    try:
        for name, write in writers.items():
            try:
                write(staging / name)
            except OSError as exc:
                raise UsageError(f"{output / name}: cannot write: {exc.strerror or exc}") from None
        if output.exists():
            if not overwrite:
                raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
            output.rename(retired)
        try:
            staging.rename(output)
        except BaseException:
            if retired.exists() and not output.exists():
                retired.rename(output)  # put the old folder back
            raise
    finally:
        for leftover in (staging, retired):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


# --- sensitivity and tune ---------------------------------------------------------------------

SENSITIVITY_CACHE = "sensitivity.cache.json"
SENSITIVITY_MODES = ("only_quantized", "only_float")


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
    eval_data, eval_labels, warnings = _validation_data(recipe, calib_data, inputs, validation_data, labels)
    _check_gates_are_measurable(recipe, eval_labels)
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
    tick = _stage_progress(progress)
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
        _write_text_atomic(cache_path, json.dumps(_json_ready(document), indent=2) + "\n")
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
    import yaml

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
    tick = _stage_progress(progress)
    say = on_event or (lambda line: None)
    figure = objective_name(gates)
    steps = ("a16", "float") if recipe.quantization.activations.dtype in A16 else ("float",)
    interrupted = False
    state: dict = {"best": None, "writes": 0}
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
                                interrupted, max_trials, time_budget, jobs, time.monotonic() - started)

        def write_best(result: TrialResult) -> None:
            quantized, _, _ = build_trial_model(context, result.spec)
            overrides = promotion_overrides(result.spec.promotions, recipe.quantization.activations.dtype)
            text = tuned_recipe_text(recipe, overrides, output)
            _replace_file(output / "model.onnx", lambda path: save_model(quantized, path))
            _replace_file(output / TUNED_RECIPE, lambda path: path.write_text(text, encoding="utf-8"))
            state["best"], state["writes"] = result, state["writes"] + 1
            for name, write in search_report_writers(build_report(False, "running")).items():
                _replace_file(output / name, write)
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
                        _write_text_atomic(cache_path, json.dumps(_json_ready(
                            {"format": "qtool-sensitivity", "version": 1, "key": key, "mode": "only_quantized",
                             "model_sha256": file_sha256(model_path), "rows": rows}), indent=2) + "\n")
                sens.update(rows=rows, complete=complete, cache_hit=cached is not None)
                search.ranking = [row["node"] for row in rows]
                search.run()
            else:
                search.stop_reason = "the recipe as given passes the gates: nothing to promote"
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
            _replace_file(output / "model.onnx", lambda path: save_model(again.model, path))
        report = build_report(True, search.stop_reason)
        report["chosen"]["reproduced_by_quantize"] = reproduced
        for name, write in search_report_writers(report).items():
            _replace_file(output / name, write)
    return TuneResult(report, bool(best and best.passed), interrupted, output)


def _read_cache_any(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the new one, never half."""
    staging = path.with_name(f".{path.name}{STAGING_SUFFIX}")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _describe_trial(result: TrialResult, figure: str) -> str:
    value = objective(result, figure)
    shown = f"{value:.2%}" if figure == "accuracy" and math.isfinite(value) else f"{value:.4g}"
    return (f"{len(result.spec.promotions)} promotion(s), {figure} {shown}, {result.size_bytes:,} B, "
            f"gates {'pass' if result.passed else 'fail'}")


def _tune_report(model_path: Path, recipe: Recipe, setup: _TrialSetup, search: Search, sens: dict, figure: str,
                 gates: dict, stop: str, final: bool, interrupted: bool, max_trials: int,
                 time_budget: float | None, jobs: int, wall_s: float) -> dict:
    float_bytes = setup.context.float_bytes
    trials = [_trial_row(result, figure, float_bytes) for result in search.order]
    frontier = {result.spec.key for result in pareto_frontier(search.order, figure)}
    best = search.best
    for row in trials:
        row["frontier"] = row["trial"] in frontier
        row["chosen"] = best is not None and row["trial"] == best.spec.key
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
                   "calibration_s": setup.calibration_s, "steps": list(search.steps),
                   "latency": "not measured: trials are compared on size and accuracy; run `qtool compare "
                              "--bench` on the chosen model for its latency ratio"},
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
