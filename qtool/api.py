"""The use cases as plain functions: the only orchestrator and the only writer of artifacts.

The CLI calls these; so can any Python program (`import qtool`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from onnx import ModelProto

from qtool import report as reporting
from qtool.calibrate import calibrate
from qtool.compare import Comparison, GateResult, check_gates, compare_models
from qtool.data import DataFolder, model_inputs, read_labels
from qtool.errors import RecipeError, UsageError
from qtool.model import file_sha256, load_model, model_file_bytes, save_model, upgrade_opset
from qtool.numerics import QTYPES
from qtool.plan import build_plan, select_tensors
from qtool.prepare import prepare_model
from qtool.qdq import apply_plan
from qtool.recipe import Recipe, load_recipe
from qtool.runner import INTEGER_OP_TYPES, int8_kernels_may_saturate, optimized_op_histogram

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


def prepare(model_path: Path) -> tuple[ModelProto, list[str]]:
    """load → opset upgrade → graph clean-up; returns the model and what was done."""
    model = load_model(model_path)
    model, upgrade_note = upgrade_opset(model, model_path)
    model, notes = prepare_model(model)
    return model, ([upgrade_note] if upgrade_note else []) + notes


def quantize(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    validation_data: str | Path | None = None,
    labels: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Calibrate, quantize and validate one model; write artifacts if `output_dir` is given.

    `validation_data` and `labels` override the recipe's `validation.data`/`labels`.
    """
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output_dir) if output_dir is not None else None
    if output is not None:
        check_output_path(output, model_path, overwrite)
    tick = _stage_progress(progress)

    model, prepare_notes = prepare(model_path)
    inputs = model_inputs(model)
    calib_data = DataFolder(data_dir, inputs, recipe.calibration.samples, images=recipe.data.images if recipe.data else None)
    eval_data, eval_labels, warnings = _validation_data(recipe, calib_data, inputs, validation_data, labels)
    _check_gates_are_measurable(recipe, eval_labels)

    selection = select_tensors(model, recipe)
    act = recipe.quantization.activations
    table = calibrate(model, selection.calibration_tensors, calib_data, recipe.calibration,
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
    gates = check_gates(comparison, recipe.validation.gates)
    warnings += _kernel_warnings(comparison, simulated)
    ops = optimized_op_histogram(quantized)

    report = reporting.build_quantize_report(
        model_path=model_path, model_sha256=file_sha256(model_path), recipe=recipe,
        calib_data=calib_data, eval_data=eval_data, prepare_notes=prepare_notes,
        table=table, plan=plan, saturating_host=saturating,
        float_bytes=model_file_bytes(model_path), quantized_bytes=quantized.ByteSize(),
        integer_ops={op: n for op, n in sorted(ops.items()) if op in INTEGER_OP_TYPES},
        optimized_ops=dict(sorted(ops.items())),
        comparison=comparison, simulated=simulated, gates=gates, warnings=warnings,
    )
    if output is not None:
        write_artifacts(output, overwrite, {
            "model.onnx": lambda path: save_model(quantized, path),
            "report.json": lambda path: path.write_text(reporting.render_json(report), encoding="utf-8"),
            "report.md": lambda path: path.write_text(reporting.render_markdown(report), encoding="utf-8"),
        })
    return QuantizeResult(quantized, report, gates)


def _stage_progress(progress: Progress | None):
    def for_stage(stage: str):
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)
    return for_stage


def _validation_data(
    recipe: Recipe, calib_data: DataFolder, inputs, data_override: str | Path | None,
    labels_override: str | Path | None,
) -> tuple[DataFolder, dict | None, list[str]]:
    spec = recipe.validation
    warnings = []
    folder_path = Path(data_override) if data_override else recipe.resolve_path(spec.data)
    if folder_path is not None:
        folder = DataFolder(folder_path, inputs, spec.samples, images=recipe.data.images if recipe.data else None)
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
    labels = read_labels(labels_path) if labels_path.is_file() else None
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


def check_output_path(output: Path, model_path: Path, overwrite: bool) -> None:
    """The output folder may not be, or contain, the input; an existing one needs --overwrite."""
    out = output.resolve()
    source = model_path.resolve()
    if out == source or source.is_relative_to(out):
        raise UsageError(f"{output}: output folder would contain the input model {model_path}; choose another")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{output}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")


def write_artifacts(output: Path, overwrite: bool, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every artifact into a temporary folder beside `output`, then rename it into place."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".qtool-tmp", dir=output.parent))
    try:
        for name, write in writers.items():
            write(staging / name)
        if output.exists():
            if not overwrite:
                raise UsageError(f"{output}: output folder exists; pass --overwrite to replace it")
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
