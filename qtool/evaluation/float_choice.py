"""`quantization.algorithms.keep_float: auto`: keep float the layers at a model's ends where measured to pay.

Only a plan whose worst output SQNR on the calibration data is below ACT_BELOW_DB (30 dB) is touched:
above it int8 is accurate, and a float region only costs time (on digits_cnn, 1.3 % + 2.4 % of the
multiply-accumulates kept float at both ends made the model 2.4x slower: on a tiny model the
conversions at a region's borders cost more than its float compute). Candidates
(qtool.quantization.algorithms.float_ends): the first 1, 2, 3, 4, 6, ... layers from the inputs and the
last ones towards the outputs, each holding at most 10 % of the model's multiply-accumulates, so the
model keeps most of its integer speed. Each is planned as `quantize` plans (fused placement included)
and scored by its worst output SQNR on the calibration data (as bias correction's `auto` scores). A
region pays when its gain exceeds its layers' share (`share_db`: the gain were the noise spread evenly
over the layers) by MIN_GAIN_DB: it carries more of the error than its size. At each end the best
region that pays is kept (the shallower on a tie within TIE_DB); when both ends have one and together
they fit the budget, both are kept if that pays again for the second. Deterministic: the same model,
recipe and data choose the same nodes. Cost: one float run for the layers' shapes, then over the first
SCORED_SAMPLES calibration samples passes of the float model with the plan, with the deepest region of
each end and, only at an end whose deepest region pays (it holds every shallower one), with the other
regions of that end: one plan per region scored (at most 16), CANDIDATES_PER_PASS models per pass
(memory: that many sessions). On u2netp, where no region pays, 3 models scored instead of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable
from qtool.evaluation.bias_choice import worst_sqnrs
from qtool.io.model import in_one_proto
from qtool.io.samples import DataSource
from qtool.quantization.algorithms.float_ends import MAC_BUDGET, Region, candidate_regions, layer_macs, layers
from qtool.quantization.placement import Placement, plan_and_apply
from qtool.quantization.plan import Selection, select_tensors
from qtool.recipe.schema import Recipe
from qtool.runtime.session import tensor_shapes

MIN_GAIN_DB = 0.5  # a region must lift the worst output SQNR on the calibration data this much past its share
ACT_BELOW_DB = 30.0  # a plan whose worst output SQNR on the calibration data reaches this is left as it is
TIE_DB = 0.1  # candidates of one end scoring within this of the best: the cheapest wins
CANDIDATES_PER_PASS = 4
SCORED_SAMPLES = 32  # the scoring passes read at most this many calibration samples (as range choice does)
MIN_LAYERS = 4  # fewer quantized layers: no ends to keep apart from the rest
PAST_LIMIT = "auto: skipped, the model is past protobuf's 2 GB: each region scored is a quantized copy in memory"


@dataclass(frozen=True)
class ScoredRegion:
    region: Region
    sqnr_db: float  # worst output SQNR on the calibration data with this region float
    share_db: float  # the gain if every layer made the same share of the output's noise

    def as_dict(self, baseline: float) -> dict:
        return {"end": self.region.end, "depth": self.region.depth, "layers": list(self.region.layers),
                "nodes": len(self.region.nodes), "macs_fraction": round(self.region.macs_fraction, 4),
                "sqnr_db": _figure(self.sqnr_db), "gain_db": _figure(self.sqnr_db - baseline),
                "share_db": _figure(self.share_db)}


def share_db(region: Region, layer_count: int) -> float:
    """The SQNR gain (dB) from keeping the region's layers float were the output's noise power shared
    evenly among the `layer_count` layers: -10 log10(1 - kept / layer_count)."""
    return -10 * math.log10(1 - len(region.layers) / layer_count)


@dataclass(frozen=True)
class FloatEndsOutcome:
    """What `keep_float` did: `kept` the nodes kept float (node -> why), `chosen` their regions,
    `baseline_db`/`sqnr_db` the worst output SQNR on the calibration data without and with them,
    `candidates` every region scored; `skipped` why nothing was measured although on."""

    setting: str
    kept: dict[str, str] = field(default_factory=dict)
    chosen: list[ScoredRegion] = field(default_factory=list)
    candidates: list[ScoredRegion] = field(default_factory=list)
    baseline_db: float | None = None
    sqnr_db: float | None = None
    skipped: str | None = None

    def as_dict(self) -> dict:
        baseline = self.baseline_db if self.baseline_db is not None else math.nan
        if self.skipped:
            why = self.skipped
        elif self.chosen:
            why = (f"auto: worst output SQNR on the calibration data {self.baseline_db:.2f} → {self.sqnr_db:.2f} dB "
                   f"with {len(self.kept)} node(s) float at the model's "
                   + " and ".join(f"{s.region.end} ({len(s.region.layers)} layer(s), "
                                  f"{100 * s.region.macs_fraction:.1f} % of the MACs)" for s in self.chosen))
        elif self.candidates:
            best = max(self.candidates, key=lambda s: s.sqnr_db)
            why = (f"auto: no region gained {MIN_GAIN_DB:g} dB past its layers' share on the calibration data "
                   f"(best {best.sqnr_db - baseline:+.2f} dB, share {best.share_db:.2f}, {best.region.end} depth "
                   f"{best.region.depth})")
        else:
            why = f"auto: no region within {100 * MAC_BUDGET:g} % of the MACs"
        return {"setting": self.setting, "why": why, "min_gain_db": MIN_GAIN_DB, "mac_budget": MAC_BUDGET,
                "worst_output_sqnr_db": {"without": _figure(self.baseline_db), "with": _figure(self.sqnr_db)},
                "measured_on": "calibration data", "nodes": dict(self.kept),
                "chosen": [s.as_dict(baseline) for s in self.chosen],
                "candidates": [s.as_dict(baseline) for s in self.candidates]}


def _figure(value: float | None) -> float | None:
    return round(value, 2) if value is not None and math.isfinite(value) else None


def _build(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable, saturating: bool,
           kept: dict[str, str]) -> tuple[Selection, Placement]:
    chosen = select_tensors(model, recipe, {**selection.kept_float, **kept})
    return chosen, plan_and_apply(model, recipe, chosen, table, saturating)


def _scores(model: ModelProto, candidates: list[ModelProto], data: DataSource, batch_size: int) -> list[float]:
    scores: list[float] = []
    for start in range(0, len(candidates), CANDIDATES_PER_PASS):
        scores += worst_sqnrs(model, candidates[start:start + CANDIDATES_PER_PASS], data, batch_size)
    return scores


def _why(region: Region) -> str:
    side = "first" if region.end == "input" else "last"
    return (f"keep_float auto: within the {side} {region.depth} layer(s) from the model's {region.end}, kept float "
            "(report.json algorithms.keep_float: the gain measured)")


def choose_float_ends(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                      saturating: bool, placed: Placement, data: DataSource
                      ) -> tuple[Selection, Placement, FloatEndsOutcome]:
    """The recipe's plan (`selection`, `placed`) with the float regions `auto` chooses, and the outcome;
    `selection` and `placed` unchanged when none pays. Raises what planning and ONNX Runtime raise."""
    setting = recipe.quantization.algorithms.keep_float
    batch_size = recipe.calibration.batch_size
    data = data.reopen(min(data.limit or SCORED_SAMPLES, SCORED_SAMPLES))
    count = len(layers(model, selection))
    if count < MIN_LAYERS:
        return selection, placed, FloatEndsOutcome(setting, skipped=f"auto: fewer than {MIN_LAYERS} quantized layers")
    if not in_one_proto(model):
        return selection, placed, FloatEndsOutcome(setting, skipped=PAST_LIMIT)
    (baseline,) = _scores(model, [placed.model], data, batch_size)
    if baseline == -math.inf:
        return selection, placed, FloatEndsOutcome(setting, skipped="auto: no float output to score")
    if baseline >= ACT_BELOW_DB:
        return selection, placed, FloatEndsOutcome(setting, baseline_db=baseline, skipped=(
            f"auto: the plan's worst output SQNR on the calibration data, {baseline:.2f} dB, reaches "
            f"{ACT_BELOW_DB:g} dB: nothing to lift"))
    # MAC shares only: one sample's shapes (placement's, when it measured them) give the same fractions
    shapes = table.shapes or tensor_shapes(model, next(data.batches(1)).feeds)
    macs = layer_macs(model, selection, shapes)
    regions = candidate_regions(model, selection, macs)
    if not regions:
        return selection, placed, FloatEndsOutcome(setting, baseline_db=baseline)
    built: dict[Region, tuple[Selection, Placement]] = {}

    def scored_regions(chosen: list[Region]) -> list[ScoredRegion]:
        for region in chosen:
            built[region] = _build(model, recipe, selection, table, saturating, {n: _why(region) for n in region.nodes})
        figures = _scores(model, [built[region][1].model for region in chosen], data, batch_size)
        return [ScoredRegion(region, figure, share_db(region, count)) for region, figure in zip(chosen, figures)]

    def pays(scored: ScoredRegion) -> bool:
        return scored.sqnr_db >= baseline + scored.share_db + MIN_GAIN_DB

    # a deeper region holds every shallower one of its end: where the deepest does not pay, the end is left
    deepest = scored_regions([max((r for r in regions if r.end == end), key=lambda r: r.depth)
                     for end in ("input", "output") if any(r.end == end for r in regions)])
    rest = scored_regions([r for r in regions if any(pays(d) and d.region.end == r.end for d in deepest)
                  and r not in {d.region for d in deepest}])
    scored = sorted(deepest + rest, key=lambda s: regions.index(s.region))
    best: list[ScoredRegion] = []
    for end in ("input", "output"):
        mine = [s for s in scored if s.region.end == end and pays(s)]
        top = max((s.sqnr_db for s in mine), default=-math.inf)
        pick = next((s for s in mine if s.sqnr_db >= top - TIE_DB), None)  # shallow first
        if pick is not None:
            best.append(pick)
    if not best:
        return selection, placed, FloatEndsOutcome(setting, candidates=scored, baseline_db=baseline)
    best.sort(key=lambda s: -s.sqnr_db)
    chosen, figure = best[:1], best[0].sqnr_db
    kept = {node: _why(best[0].region) for node in best[0].region.nodes}
    result = built[best[0].region]
    if len(best) == 2 and sum(s.region.macs_fraction for s in best) <= MAC_BUDGET:
        both = {node: _why(s.region) for s in best for node in s.region.nodes}
        together = _build(model, recipe, selection, table, saturating, both)
        (joint,) = _scores(model, [together[1].model], data, batch_size)
        if joint >= figure + share_db(best[1].region, count) + MIN_GAIN_DB:
            chosen, figure, kept, result = best, joint, both, together
    return result[0], result[1], FloatEndsOutcome(setting, kept, chosen, scored, baseline, figure)
