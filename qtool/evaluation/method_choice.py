"""`calibration.method: auto`: the per-tensor range choice, kept only where the whole model agrees.

One histogram pass gives every tensor its candidate ranges (qtool.calibration.observers.
CandidateObserver); qtool.quantization.algorithms.range_choice picks one per tensor by its readers'
local error. A local error is not the model's: on the shared models per-tensor choice gains 2 dB on
one and loses on another against one method for all tensors. So `choose_method` builds the quantized
model four ways — minmax, the recipe's percentile or mse for every tensor, or the per-tensor choice —
and keeps the one whose worst output SQNR on the calibration data (never the validation data: the
choice must not peek at what judges it) is highest; ties go to the earlier, so minmax wins when
nothing beats it. Deterministic: the same model, recipe and data choose the same ranges.
"""

from __future__ import annotations

import math
from dataclasses import replace

from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.evaluation.compare import compare_models
from qtool.io.samples import DataSource
from qtool.quantization.algorithms.range_choice import SCORED_SAMPLES, per_tensor_ranges
from qtool.quantization.placement import plan_and_apply
from qtool.quantization.plan import Selection
from qtool.recipe.schema import Recipe

CANDIDATES = ("minmax", "percentile", "mse", "per_tensor")  # ties go to the earlier


def uniform_table(table: CalibrationTable, candidate: str) -> CalibrationTable:
    """The table with every candidate-carrying tensor at its `candidate` range (minmax where it has none)."""
    ranges = {}
    for name, found in table.ranges.items():
        offered = found.summary.get("candidates")
        if offered is None:
            ranges[name] = found
            continue
        kept = candidate if candidate in offered else "minmax"
        lo, hi = offered[kept]
        ranges[name] = TensorRange(float(lo), float(hi), found.method, {**found.summary, "chosen": kept})
    return replace(table, ranges=ranges)


def _worst_sqnr(model: ModelProto, quantized: ModelProto, data: DataSource, batch_size: int) -> float:
    comparison = compare_models(model, quantized, data, batch_size=batch_size)
    figures = [out.get("sqnr_db") for out in comparison.outputs.values()]
    finite = [value for value in figures if isinstance(value, (int, float)) and not math.isnan(value)]
    return min(finite) if finite else -math.inf


def choose_method(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                  saturating_host: bool, data: DataSource) -> CalibrationTable:
    """From a table calibrated with method auto, the ranges of the best of CANDIDATES.

    model: the prepared float model; selection: what was calibrated. Costs the per-tensor scoring pass
    plus, per candidate, one placement and one float/quantized run over at most SCORED_SAMPLES
    calibration samples. The table's `method_choice` gives every candidate's worst output SQNR (dB;
    -inf for a model that quantized nothing usable), the one chosen, and what the per-tensor choice
    picked per tensor (`per_tensor`).
    """
    per_tensor = per_tensor_ranges(model, recipe, selection, table, saturating_host, data)
    options = {"minmax": uniform_table(table, "minmax"),
               "percentile": uniform_table(table, f"p{recipe.calibration.percentile:g}"),
               "mse": uniform_table(table, "mse"), "per_tensor": per_tensor}
    scored = data.reopen(min(data.limit or SCORED_SAMPLES, SCORED_SAMPLES))
    scores = {name: _worst_sqnr(model, plan_and_apply(model, recipe, selection, option, saturating_host).model,
                                scored, recipe.calibration.batch_size) for name, option in options.items()}
    chosen = max(CANDIDATES, key=lambda name: (scores[name], -CANDIDATES.index(name)))
    choice = {"candidates": list(CANDIDATES), "chosen": chosen, "worst_output_sqnr_db": scores,
              "measured_on": "calibration data", "per_tensor": per_tensor.method_choice}
    figures = ", ".join(f"{name} {value:.2f} dB" for name, value in scores.items())
    note = (f"calibration.method auto chose {chosen} (worst output SQNR on the calibration data: {figures}); "
            f"{per_tensor.notes[-1].removeprefix('calibration.method auto chose ')}")
    return replace(options[chosen], method_choice=choice, notes=[*table.notes, note])
