"""`quantization.algorithms.bias_correction`: measure, correct, and (`auto`) keep it only where it helps.

Correcting a layer's weight-rounding shift (qtool.quantization.algorithms.bias_correction) is right in
expectation layer by layer, yet the whole model can come out worse: on centerface it lowers the worst
output's SQNR on the calibration data too (6.77 → 6.65 dB; the depthwise layers' corrections cost
most), so the loss is neither noise in the shift estimates nor overfitting to the calibration samples.
`auto` therefore builds both models, scores each on the calibration data by its worst output SQNR
(as `calibration.method: auto` does) and keeps the correction only when it scores higher.
Deterministic: the same model, recipe and data make the same choice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable
from qtool.io.model import in_one_proto
from qtool.io.samples import DataSource
from qtool.quantization.algorithms.bias_correction import (BiasShift, LayerShift, has_layers, measure_shifts,
                                                           requantize)
from qtool.quantization.algorithms.streaming import measured
from qtool.quantization.plan import QuantPlan, Selection
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session

PAST_LIMIT = ("auto: skipped, the model is past protobuf's 2 GB: measuring holds every corrected layer's "
              "weight error in memory (about twice the model); set bias_correction: true to measure anyway")


@dataclass(frozen=True)
class BiasOutcome:
    """What bias correction did to one plan: the layers measured (`layers`, one row each), whether
    the corrected model was kept, and under `auto` both models' worst output SQNR on the calibration
    data (dB; None when not compared). `shifts`: what was measured, for trials that apply it as kept."""

    layers: list[BiasShift]
    kept: bool
    setting: bool | str
    sqnr_without_db: float | None = None
    sqnr_with_db: float | None = None
    shifts: dict[str, LayerShift] = field(default_factory=dict, repr=False)
    skipped: str | None = None  # why it was not measured at all

    def as_dict(self) -> dict:
        if self.skipped:
            why = self.skipped
        elif not self.layers:
            why = "no quantized Conv, ConvTranspose or Gemm with a constant weight had a shift to correct"
        elif self.sqnr_with_db is None:
            why = "bias_correction: true keeps it unchecked"
        elif self.kept:
            why = (f"auto: the corrected model's worst output SQNR on the calibration data is higher "
                   f"({self.sqnr_with_db:.2f} dB vs {self.sqnr_without_db:.2f} without)")
        else:
            why = (f"auto: dropped, the corrected model's worst output SQNR on the calibration data is not higher "
                   f"({self.sqnr_with_db:.2f} dB vs {self.sqnr_without_db:.2f} without)")
        return {"setting": self.setting, "kept": self.kept, "why": why,
                "worst_output_sqnr_db": {"without": self.sqnr_without_db, "with": self.sqnr_with_db},
                "measured_on": "calibration data",
                "layers": [asdict(layer) for layer in self.layers]}


def worst_sqnrs(model: ModelProto, candidates: list[ModelProto], data: DataSource, batch_size: int) -> list[float]:
    """Each candidate's lowest float-output SQNR (dB: 10·log10(Σ ref² / Σ (ref − out)²) over `data`)
    against `model`, in one pass: the float model runs once for all; +inf for an exact candidate,
    -inf where no output is float. Sessions use ONNX Runtime's default optimizations (the integer
    kernels a user gets)."""
    streams = [measured(make_session(each), model, data, batch_size) for each in (model, *candidates)]
    signal: dict[str, float] = {}
    noise: list[dict[str, float]] = [{} for _ in candidates]
    for runs in zip(*streams):
        for name, reference in runs[0][1].items():
            if reference.dtype.kind != "f":
                continue
            reference = reference.astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(np.square(reference)))
            for errors, (_, outputs) in zip(noise, runs[1:]):
                errors[name] = errors.get(name, 0.0) + float(np.sum(np.square(reference - outputs[name])))
    return [min((10 * math.log10(signal[name] / errors[name]) if errors[name] > 0 else math.inf
                 for name in signal if signal[name] > 0), default=-math.inf) for errors in noise]


def correct_bias(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                 saturating_host: bool, plan: QuantPlan, quantized: ModelProto, data: DataSource
                 ) -> tuple[QuantPlan, ModelProto, BiasOutcome]:
    """The recipe's bias correction of `quantized` (the recipe's plan of `model`, placement included):
    (plan, quantized model, outcome). `true` corrects; `auto` also runs both models over `data` and
    keeps the corrected one only if its worst output SQNR is higher. Costs one streaming pass of the
    float model (the shifts), one planning pass and, under `auto`, one pass of the float and both
    quantized models."""
    setting = recipe.quantization.algorithms.bias_correction
    if setting == "auto" and has_layers(selection) and not in_one_proto(model):
        return plan, quantized, BiasOutcome([], False, setting, skipped=PAST_LIMIT)
    batch_size = recipe.calibration.batch_size
    shifts = measure_shifts(model, recipe, selection, table, saturating_host, data, batch_size)
    new_plan, corrected, layers = requantize(model, recipe, table, saturating_host, plan, quantized, [shifts],
                                             selection.kept_float)
    if corrected is quantized:
        return plan, quantized, BiasOutcome(layers, False, setting, shifts=shifts)
    if setting is True:
        return new_plan, corrected, BiasOutcome(layers, True, setting, shifts=shifts)
    without, with_ = worst_sqnrs(model, [quantized, corrected], data, batch_size)
    if with_ > without:
        return new_plan, corrected, BiasOutcome(layers, True, setting, without, with_, shifts)
    return plan, quantized, BiasOutcome(layers, False, setting, without, with_, shifts)
