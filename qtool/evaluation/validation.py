"""The validate stage around `compare_models`: which data and labels a run is checked on, the figures
its gates read beside the metrics, and what a gap between ONNX Runtime's kernels and the simulation means."""

from __future__ import annotations

from pathlib import Path

from onnx import ModelProto

from qtool.errors import DataError, RecipeError, UsageError
from qtool.evaluation.compare import ACCURACY_GATES, GATES, Comparison, not_applicable
from qtool.evaluation.latency import bench_models, latency_section
from qtool.evaluation.per_layer import layer_errors, layers_section, weight_errors
from qtool.evaluation.labels import label_warnings, labels_source
from qtool.io.data import read_labels
from qtool.io.feeds import open_data
from qtool.io.samples import DataSource, integer_outputs
from qtool.recipe.schema import Recipe
from qtool.runtime.session import INTEGER_OP_TYPES


def resolve_validation_data(
    recipe: Recipe, calib_data: DataSource | None, inputs, data_override: str | Path | None,
    labels_override: str | Path | None,
) -> tuple[DataSource, dict | None, list[str]]:
    spec = recipe.validation
    warnings = []
    folder_path = Path(data_override) if data_override else recipe.resolve_path(spec.data)
    if folder_path is not None and not data_override and not folder_path.exists():
        raise RecipeError(f"{recipe.source}: validation.data: no such data folder or file {folder_path}")
    if folder_path is not None:
        folder = open_data(folder_path, inputs, spec.samples, recipe)
        calib_folder = calib_data.folder if calib_data is not None else None
        if isinstance(calib_folder, Path) and _same_path(folder_path, calib_folder):
            warnings.append(f"validation ran on the calibration data ({folder_path} is the --data folder): "
                            "figures are optimistic")
    elif calib_data is None:
        raise UsageError("no calibration data is read (--calibration, or mode dynamic without --data): give "
                         "validation data with "
                         "--validation-data or the recipe's validation.data")
    else:
        folder = calib_data.reopen(spec.samples)
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
        labels_path = Path(folder.folder) / "labels.txt"
    if not labels_path.is_file():
        return folder, folder.class_labels, warnings
    labels = read_labels(labels_path)
    files = getattr(folder, "files", None)
    if labels and files and not any(name in labels for name in files):  # a gate on no samples would read n/a
        raise DataError(f"{labels_path}: names none of the {len(files)} validation files in {folder.folder} "
                        f"(no line for {files[0]!r}, for one); expected `file label` lines for those files")
    return folder, labels, warnings


def _same_path(first, second) -> bool:
    try:
        return Path(first).resolve() == Path(second).resolve()
    except (OSError, RuntimeError):  # a symlink loop: not provably the same
        return False


def accuracy_warnings(comparison: Comparison, labels: dict | None) -> list[str]:
    """What the comparison's top-1 accuracy measured, when it may be nothing: labels for part of the
    data, or a float accuracy at chance (see `label_warnings`)."""
    if not labels:
        return []
    return label_warnings(comparison.samples, comparison.labelled, comparison.accuracy.get("reference"),
                          comparison.classes, labels_source(labels))


def tie_warnings(comparison: Comparison) -> list[str]:
    """A warning per output whose float (reference) top-1 was a tie on some samples: argmax picks
    class 0 there by convention, so those samples are no evidence of agreement and top-1 agreement
    leaves them out; on every sample, it cannot be measured and min_top1_agreement fails."""
    warnings = []
    for name, figures in comparison.outputs.items():
        ties = figures.get("top1_ties", 0)
        if not ties:
            continue
        what = (f"output {name}: the reference's top-1 is a tie (equal top scores: a constant output?) on {ties} of "
                f"{comparison.samples} samples")
        if "top1_agreement" in figures:
            warnings.append(f"{what}: top-1 agreement counts the other {comparison.samples - ties} only")
        else:
            warnings.append(f"{what}: top-1 agreement cannot be measured (a min_top1_agreement gate fails); "
                            "check the model and its input preprocessing")
    return warnings


def check_gates_are_measurable(recipe: Recipe, labels: dict | None) -> None:
    if "max_accuracy_drop" in recipe.validation.gates and not labels:
        raise RecipeError(
            f"{recipe.source}: validation.gates.max_accuracy_drop needs labels: set validation.labels "
            "or put labels.txt in the validation data folder"
        )


def unmeasurable_gates(gates: dict[str, float], model: ModelProto) -> str:
    """Why the accuracy gates among `gates` cannot judge `model` ("" when one of them can, or there
    are none): every one reads a figure its declared outputs do not have (cosine and SQNR on outputs
    that are all integer, exact match on outputs that are all float). Such a run would pass on
    nothing; the caller raises it as a RecipeError or UsageError (exit 2), as tune does."""
    accuracy = [name for name in gates if name in ACCURACY_GATES]
    integer = integer_outputs(model)
    whys = {name: not_applicable(GATES[name][0], integer) for name in accuracy}
    if not accuracy or not all(whys.values()):
        return ""
    if all(integer):
        kind, wanted = "integer (tags, class ids)", "min_exact_match (the fraction of elements equal)"
    else:
        kind, wanted = "float", "min_cosine, min_sqnr_db or min_slice_sqnr_db"
    return (f"{', '.join(accuracy)} cannot be measured on this model (every output of it is {kind}): a run would "
            f"pass on nothing; gate it with {wanted}")


def layers_and_latency(reference: ModelProto, candidate: ModelProto, data: DataSource, batch_size: int,
                       per_layer: bool, bench: bool, threads: int | None, tick,
                       reasons: dict[str, str] | None = None) -> tuple[dict | None, dict | None]:
    layers = latency = None
    if per_layer:
        activations, unmatched = layer_errors(reference, candidate, data, batch_size=batch_size,
                                              progress=tick("per-layer"))
        layers = layers_section(activations, weight_errors(reference, candidate), unmatched, reasons)
    if bench:
        feeds = next(data.batches(1)).feeds
        latency = latency_section(bench_models(reference, candidate, feeds, threads=threads))
    return layers, latency


def slower_warning(latency: dict | None, what: str = "the quantized model", against: str = "float") -> list[str]:
    """A warning when `what` (a report's latency section's candidate) is slower than `against` (its
    reference) by more than the timing's noise: its 95 % interval lies above 1. [] otherwise."""
    if latency is None:
        return []
    low, high = latency["ratio_interval"]
    if latency["ratio"] <= 1.0 or low <= 1.0:
        return []
    return [f"{what} is slower than {against}: latency ratio {latency['ratio']:.2f} (95 % interval {low:.2f}–"
            f"{high:.2f}; {latency['candidate']['median_ms']:.3g} ms vs {latency['reference']['median_ms']:.3g} ms "
            f"{against}, {latency['candidate']['runs']} interleaved rounds)"]


def slower_than_float(latency: dict | None, compared: bool = False) -> list[str]:
    """A warning when the quantized model is slower than float (`compared`: the candidate than the
    reference, as `compare` names them), and one when the timing stayed too noisy to say which is
    faster (its interval never got tight and holds 1: a busy machine)."""
    if latency is None:
        return []
    low, high = latency["ratio_interval"]
    warnings = slower_warning(latency, *(("the candidate", "the reference") if compared else ()))
    if not latency["tight"] and low <= 1.0 <= high:
        warnings.append(f"the latency ratio {latency['ratio']:.2f} is noisy: its 95 % interval is {low:.2f}–{high:.2f} "
                        f"after {latency['candidate']['runs']} interleaved rounds (the machine was busy), too wide "
                        "to say whether the quantized model is faster than float; time again on a quiet machine")
    return warnings


def extra_figures(reference_bytes: int, candidate_bytes: int, latency: dict | None) -> dict:
    return {"size_ratio": reference_bytes / candidate_bytes if candidate_bytes else None,
            "latency_ratio": latency["ratio"] if latency else None}


def kernel_gap_cause(quantized: ModelProto, optimized_ops: dict[str, int], saturating_host: bool) -> str:
    """What most likely makes ONNX Runtime's optimized run worse than the Q/DQ simulation."""
    written = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    if optimized_ops.get("MatMulNBits", 0) > written:
        return ("ONNX Runtime fused DequantizeLinear -> MatMul into MatMulNBits, which by default computes with "
                "8-bit activations; the session option session.qdq_matmulnbits_accuracy_level=1 keeps them float")
    if any(op in INTEGER_OP_TYPES for op in optimized_ops) and saturating_host:
        return "int8 kernels may saturate on this CPU (try quantization.weights.reduce_range: true)"
    if any(op in INTEGER_OP_TYPES for op in optimized_ops):
        return ("ONNX Runtime's integer kernels compute differently from the Q/DQ simulation (fused "
                "requantization, dynamic quantization of activations at run time); this CPU's int8 kernels "
                "do not saturate (VNNI), so reduce_range would only cost accuracy")
    return ("ONNX Runtime's graph optimizations changed the result (no integer kernels ran): "
            "a qtool or ONNX Runtime bug, please report it")


def kernel_warnings(kernels: Comparison, simulated: Comparison, cause: str) -> list[str]:
    """Flag ONNX Runtime's optimized run losing accuracy the Q/DQ simulation does not."""
    return [f"output {name}: ONNX Runtime gives SQNR {figures['sqnr_db']:.1f} dB against "
            f"{simulated.outputs[name]['sqnr_db']:.1f} dB simulated; {cause}"
            for name, figures in kernels.outputs.items()
            if "exact_match" not in figures  # integer outputs (tags, ids) have no SQNR worth the name
            and simulated.outputs[name]["sqnr_db"] - figures["sqnr_db"] > 3.0]
