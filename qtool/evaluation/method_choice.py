"""`calibration.method: auto`: the range method whose quantized model reproduces the float outputs best.

No one method is right for every model: on the shared models percentile gains 2 dB of output SQNR
on ppocr_det over minmax and entropy loses 7, while minmax is best on others. `choose_method`
calibrates with each candidate, builds the quantized model exactly as `quantize` would, and scores
it on the calibration data (never the validation data: the choice must not peek at what judges it)
by its worst output SQNR; ties go to the earlier candidate, so minmax wins when nothing beats it.
Deterministic: the same model, recipe and data choose the same method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable
from qtool.calibration.calibrate import calibrate as calibrate_tensors
from qtool.evaluation.compare import compare_models
from qtool.io.samples import DataSource
from qtool.numerics import QTYPES
from qtool.quantization.placement import plan_and_apply
from qtool.quantization.plan import Selection
from qtool.recipe.schema import Recipe

CANDIDATES = ("minmax", "percentile", "mse")  # entropy is left out: it never won and is the slowest


@dataclass(frozen=True)
class MethodChoice:
    chosen: str
    worst_sqnr_db: dict[str, float]  # candidate -> its model's worst output SQNR on the calibration data

    def as_dict(self) -> dict:
        return {"candidates": list(self.worst_sqnr_db), "chosen": self.chosen,
                "worst_output_sqnr_db": self.worst_sqnr_db, "measured_on": "calibration data"}


def with_method(recipe: Recipe, method: str) -> Recipe:
    """The recipe with `calibration.method` set (per-tensor overrides still apply)."""
    calibration = recipe.calibration.model_copy(update={"method": method})
    return recipe.model_copy(update={"calibration": calibration})


def choose_method(model: ModelProto, recipe: Recipe, selection: Selection, data: DataSource,
                  saturating_host: bool, progress=None, calibrate=calibrate_tensors,
                  hessians: bool = True) -> tuple[CalibrationTable, MethodChoice]:
    """Calibrate with every candidate method, keep the table whose model scores best.

    model: the prepared float model; selection: the recipe's tensor selection (what is calibrated).
    calibrate: qtool.calibration.calibrate.calibrate's signature (e.g. sharded on Ray);
    hessians: also measure gptq's E[x xᵀ] (every candidate, as quantize would).
    Returns the chosen method's table and every candidate's score (dB; -inf for a model that
    quantized nothing usable). Costs one calibration, one placement and one float/quantized run
    over the calibration data per candidate.
    """
    act = recipe.quantization.activations
    scores: dict[str, float] = {}
    tables: dict[str, CalibrationTable] = {}
    for method in CANDIDATES:
        candidate = with_method(recipe, method)
        table = calibrate(model, selection.calibration_tensors, data, candidate.calibration, QTYPES[act.dtype],
                          act.symmetric, progress, selection.hessian_inputs if hessians else None)
        quantized = plan_and_apply(model, candidate, selection, table, saturating_host).model
        comparison = compare_models(model, quantized, data, batch_size=recipe.calibration.batch_size)
        figures = [out.get("sqnr_db") for out in comparison.outputs.values()]
        finite = [value for value in figures if isinstance(value, (int, float)) and not math.isnan(value)]
        scores[method] = min(finite) if finite else -math.inf
        tables[method] = table
    chosen = max(CANDIDATES, key=lambda method: (scores[method], -CANDIDATES.index(method)))
    choice = MethodChoice(chosen, scores)
    return replace(tables[chosen], method_choice=choice.as_dict()), choice
