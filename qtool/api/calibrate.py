"""`qtool calibrate`: the calibration table of the tensors a recipe quantizes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from onnx import ModelProto

from qtool import __version__
from qtool.calibration import interchange
from qtool.calibration.calibrate import CalibrationTable
from qtool.calibration.clipping import clipping_warnings
from qtool.calibration.table_file import save_table, table_document
from qtool.calibration.shards import calibrate_with
from qtool.distributed.ray_executor import refuse_past_limit
from qtool.errors import UsageError
from qtool.evaluation.method_choice import choose_method
from qtool.io.artifacts import check_writable
from qtool.io.external import in_scratch
from qtool.io.feeds import open_data
from qtool.io.targets import check_output_file, check_output_path
from qtool.io.model import file_sha256
from qtool.numerics import QTYPES
from qtool.quantization.plan import select_tensors
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe
from qtool.runtime.session import int8_kernels_may_saturate

from qtool.api.common import Progress, data_inputs, path_or_none, prepare, recipe_inputs, stage_progress

@dataclass(frozen=True)
class CalibrateResult:
    table: CalibrationTable
    document: dict  # the table file's content
    output: Path | None
    warnings: list[str] = field(default_factory=list)  # entropy ranges that clip much (calibration/clipping.py)


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
    The result's `warnings` name entropy ranges that clip over 1 % of a tensor's values.
    """
    model_path = Path(model_path)
    if format not in interchange.FORMATS:
        raise UsageError(f"calibration format {format!r}: allowed: {', '.join(interchange.FORMATS)}")
    refuse_past_limit(model_path, executor)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(output) if output is not None else None
    read_paths = (path_or_none(data_dir), *recipe_inputs(recipe))
    if output is not None and format == "ort-table":
        check_output_path(output, model_path, overwrite, read_paths, ours=(
            "folder of ONNX Runtime's calibration table",
            lambda folder: {entry.name for entry in folder.iterdir()} <= set(interchange.ORT_FILES)))
    elif output is not None:
        check_output_file(output, model_path, read_paths, what="calibration table", overwrite=overwrite)
        check_writable(output, "write")  # before calibrating, not after
    model, _ = prepare(model_path, recipe)
    data = open_data(data_dir, data_inputs(model, model_path), recipe.calibration.samples, recipe)
    selection = select_tensors(model, recipe)
    table = measure_ranges(model, recipe, selection, data, stage_progress(progress)("calibrate"),
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
    return CalibrateResult(table, document, output, clipping_warnings(table))


def measure_ranges(model: ModelProto, recipe: Recipe, selection, data, progress, executor: str = "local",
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
