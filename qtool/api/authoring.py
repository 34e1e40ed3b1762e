"""The authoring use cases: `qtool inspect` (what qtool would do to a model) and `qtool init` (a starter recipe)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from onnx import ModelProto

from qtool.authoring import inspection
from qtool.authoring import starter
from qtool.errors import DataError, ModelError, QtoolError, UsageError
from qtool.evaluation.latency import BenchResult, bench_models
from qtool.io.artifacts import guarded, write_text_atomic
from qtool.io.external import in_scratch
from qtool.io.feeds import open_data
from qtool.io.samples import DataSource
from qtool.io.targets import check_output_file
from qtool.io.model import load_model, opset_version, read_header
from qtool.quantization.coverage import check_coverage, no_kernel_pays
from qtool.quantization.placement import preview_plan
from qtool.quantization.plan import select_tensors
from qtool.recipe.load import load_recipe, parse_recipe
from qtool.recipe.schema import Recipe, recipe_json_schema
from qtool.runtime.session import int8_kernels_may_saturate

from qtool.api.common import BENCH_THREADS, Progress, data_inputs, prepare, stage_progress

LATENCY_PROBE_ROUNDS = 60  # qtool init's float/int8 timing: a few seconds at most


@in_scratch  # past 2 GB: the weights' work files go when it returns
def inspect(model_path: str | Path, recipe: Recipe | str | Path | None = None,
            data: str | Path | None = None) -> inspection.Inspection:
    """What a model is and what qtool would do to it under `recipe`.

    Problems qtool would refuse or change later are listed, not raised; only
    a file that is not a readable ONNX model is an error, and `data` (a calibration folder or file) that
    cannot feed it: `placement: fast` previews on its first sample's tensor shapes, as quantize plans
    (without it, fast is counted as fused, with a note).
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
            sample = _first_sample(model, model_path, recipe, data)
            selection = select_tensors(model, recipe)
            plan = preview_plan(model, recipe, selection, int8_kernels_may_saturate(), sample).plan
            decisions = plan.nodes
            try:  # what quantize refuses before calibrating: nothing to quantize, or no 8-bit kernel that pays
                check_coverage(plan, sum(d.quantized for d in selection.nodes), model=model_path,
                               recipe=recipe.source, ranges_from="placeholder ranges", table=False)
            except ModelError as exc:
                problems.append(inspection.Problem("refuse", str(exc).removesuffix("; nothing written")))
            notes.append("nodes quantized: as `qtool quantize` places them (placeholder ranges); calibration can "
                         "keep a few more float (degenerate ranges, Concat inputs far apart; keep_float auto's "
                         "end regions, measured on the data)")
            if recipe.quantization.placement == "fast":
                notes.append(f"placement fast: the groups quantize keeps float for speed estimated on the tensor "
                             f"shapes of the first sample of {data}" if sample is not None else
                             "placement fast: the groups quantize keeps float for speed are estimated on the tensor "
                             "shapes of a calibration sample; without --data inspect reads none: counted as fused")
    opset = inspection.opset_problem(opset_version(header), upgraded)
    return inspection.describe_model(
        header, model_path, ([opset] if opset else []) + problems, prepare_notes=notes,
        recipe=str(recipe.source) if recipe.source else "built-in default", decisions=decisions,
    )


def _first_sample(model: ModelProto, model_path: Path, recipe: Recipe, data: str | Path | None) -> DataSource | None:
    """`data` opened as quantize reads it, one sample (None without `data`); a DataError when it holds none."""
    if data is None:
        return None
    source = open_data(data, data_inputs(model, model_path), 1, recipe)
    if next(source.batches(1), None) is None:
        raise DataError(f"{data}: holds no sample")
    return source


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
    progress: Progress | None = None,
) -> InitResult:
    """Write a starter recipe for `model_path` (and the JSON Schema beside it unless `schema` names one).

    With `data_dir`, the recipe's int8 model (placed on placeholder ranges) is timed against float on its
    first sample; measured above 0.9x float, the recipe's comments and the warnings say that its
    max_latency_ratio gate will likely fail here (the gate stays: a model slower than float is no model to ship).
    The written text is checked to load as a recipe before anything is written; an `image` value
    data.images would refuse is a UsageError naming its option (`--std 0`) first. `progress` hears
    stage "timing" (0 of 1, then 1 of 1) around that timing: a minute or more on a large model.
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
    latency, unmeasured, all_float = None, "", False
    if data is not None:
        tick = stage_progress(progress)("timing") or (lambda done, total: None)
        tick(0, 1)
        latency, unmeasured, all_float = _probe_latency(model_path, recipe, data)
        tick(1, 1)
    slow = None
    if latency is not None and (all_float or latency.ratio > starter.LATENCY_MARGIN):  # the gate would fail, or flap
        slow = starter.MeasuredLatency(latency.ratio, latency.reference.median_ms, latency.candidate.median_ms,
                                       latency.candidate.runs, all_float)
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


def _probe_latency(model_path: Path, recipe: Recipe, data: Path) -> tuple[BenchResult | None, str, bool]:
    """The starter recipe's model against float on the first sample of `data`, as quantize times them
    (interleaved, one thread), its plan placed on placeholder ranges (what ORT runs depends on the graph,
    not the ranges) and, for `placement: fast`, that sample's tensor shapes, as quantize places it. Where
    fast keeps every node float (quantize refuses), the fused plan is timed and the flag is True. Else
    (None, why, False): the data cannot be read as the recipe says, or ONNX Runtime refused to run the
    model on it (its message, first line)."""
    try:
        model, _ = prepare(model_path, recipe)
        source = open_data(data, data_inputs(model, model_path), 1, recipe)
        feeds = next(source.batches(1)).feeds
        selection, saturating = select_tensors(model, recipe), int8_kernels_may_saturate()
        placed = preview_plan(model, recipe, selection, saturating, source)
        all_float = no_kernel_pays(placed.plan)
        if all_float:  # what quantize refuses: time what `placement: fused` would run instead
            placed = preview_plan(model, recipe.with_placement("fused"), selection, saturating)
        return bench_models(model, placed.model, feeds, threads=BENCH_THREADS, rounds=LATENCY_PROBE_ROUNDS,
                            max_seconds=2.0), "", all_float
    except StopIteration:
        return None, "the data holds no sample", False
    except QtoolError as exc:
        return None, str(exc), False
    except Exception as exc:  # ORT's own Fail/InvalidArgument/... on this sample
        return None, (f"ONNX Runtime: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                      ), False


def _is_qtool_schema(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("title") == "qtool recipe"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
