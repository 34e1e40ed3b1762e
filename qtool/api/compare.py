"""`qtool compare`: a reference and a candidate model on the same data, gated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from qtool.errors import ModelError, UsageError
from qtool.evaluation.compare import GATES, GateResult, check_gates, compare_models
from qtool.evaluation.validation import (accuracy_warnings, extra_figures, layers_and_latency, slower_than_float,
                                         tie_warnings, unmeasurable_gates)
from qtool.io.artifacts import write_artifacts
from qtool.io.data import model_inputs, read_labels
from qtool.io.external import in_scratch
from qtool.io.feeds import open_data
from qtool.io.targets import check_output_path
from qtool.io.model import QUANTIZED_OP_TYPES, load_model, model_file_bytes
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe, gate_problem
from qtool.reporting import document as reporting
from qtool.reporting.files import check_ci_files, report_writers
from qtool.runtime.session import check_runnable

from qtool.api.common import Progress, bench_threads, prepare, recipe_inputs, stage_progress, write_ci_files_of

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
    threads = bench_threads(threads)
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
                                         bench or "max_latency_ratio" in wanted, threads, tick)
    reference_bytes, candidate_bytes = model_file_bytes(reference_path), model_file_bytes(candidate_path)
    results = check_gates(comparison, wanted, extra_figures(reference_bytes, candidate_bytes, latency))
    report = reporting.build_compare_report(
        reference_path=reference_path, candidate_path=candidate_path, recipe=recipe if recipe_given else None,
        data=data, labels_path=labels_path if labels_path.is_file() else None,
        reference_bytes=reference_bytes, candidate_bytes=candidate_bytes, comparison=comparison,
        gates=results, layers=layers, latency=latency,
        warnings=(accuracy_warnings(comparison, truth) + tie_warnings(comparison)
                  + slower_than_float(latency, compared=True)),
    )
    if output is not None:
        write_artifacts(output, overwrite, report_writers(report))
    result = CompareResult(report, results)
    write_ci_files_of(result, junit, step_summary, output)
    return result
