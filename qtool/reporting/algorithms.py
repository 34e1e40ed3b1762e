"""The report's `algorithms` section: each post-training algorithm, whether it ran, and per layer what it changed."""

from __future__ import annotations

from dataclasses import asdict

from qtool.evaluation.bias_choice import BiasOutcome
from qtool.evaluation.float_choice import FloatEndsOutcome
from qtool.quantization.algorithms.bias_correction import MIN_T, NO_DATA
from qtool.quantization.algorithms.equalization import EqualizedPair
from qtool.quantization.algorithms.outliers import OutlierOutcome
from qtool.quantization.algorithms.smoothing import SmoothedGroup
from qtool.recipe.schema import Recipe

OUTLIERS_NO_DATA = "outliers: needs calibration data (--data), not a calibration table: skipped"
KEEP_FLOAT_NO_DATA = "keep_float: needs calibration data (--data), not a calibration table: skipped"


def algorithms_section(recipe: Recipe, equalized: list[EqualizedPair], smoothed: list[SmoothedGroup] | None,
                       corrected: BiasOutcome | None, outliers: OutlierOutcome | None = None,
                       ends: FloatEndsOutcome | None = None) -> dict:
    """`smoothed`, `corrected` and `outliers` are None where the algorithm was asked for but could not run
    (no calibration data, or a calibration table) or was not asked for. outliers' `tensors`: each outlier
    tensor, its estimated SQNR at 8 bits (dB) before and after, and its handling (`equalized`, `float`).
    bias_correction's `layers` holds every layer measured
    (`corrected_channels` 0: all its shifts were within `min_t` standard errors of zero, left as
    noise), `kept` and `why` whether the corrected model was kept (`auto` compares both), `skipped`
    why it did not run although on. keep_float's `chosen`: the regions kept float at the model's ends,
    `candidates` every region tried (its layers, fraction of the multiply-accumulates, worst output
    SQNR on the calibration data and gain in dB), `nodes` the nodes kept float."""
    switches = recipe.quantization.algorithms
    return {
        "equalization": {"enabled": switches.equalization, "pairs": [asdict(pair) for pair in equalized]},
        "smoothing": {"enabled": switches.smoothing and smoothed is not None,
                      "groups": [{**asdict(group), "norms": list(group.norms), "readers": list(group.readers)}
                                 for group in smoothed or []]},
        "bias_correction": {"enabled": corrected is not None and corrected.kept, "min_t": MIN_T,
                            **(corrected.as_dict() if corrected is not None else
                               {"setting": switches.bias_correction, "kept": False, "layers": []}),
                            **({"skipped": NO_DATA} if switches.bias_correction and corrected is None else {})},
        "outliers": {"enabled": outliers is not None, "setting": switches.outliers,
                     **(outliers.as_dict() if outliers is not None else {"tensors": []}),
                     **({"skipped": OUTLIERS_NO_DATA} if switches.outliers == "auto" and outliers is None else {})},
        "keep_float": {"enabled": ends is not None and bool(ends.kept), "setting": switches.keep_float,
                       **(ends.as_dict() if ends is not None else {"nodes": {}, "chosen": [], "candidates": []}),
                       **({"skipped": KEEP_FLOAT_NO_DATA} if switches.keep_float == "auto" and ends is None else {})},
    }


def algorithms_markdown(section: dict, escape) -> list[str]:
    """report.md's lines for the section: one row per algorithm, what it changed in a phrase."""
    rows = []
    eq = section["equalization"]
    if eq["enabled"]:
        pairs = eq["pairs"]
        worst = max(pairs, key=lambda p: p["spread_before"], default=None)
        rows.append(("equalization", f"{len(pairs)} Conv pairs rescaled" + (
            f"; widest channel-range spread (max/median) {worst['spread_before']:.3g} → {worst['spread_after']:.3g} "
            f"({escape(worst['first'])})" if worst else "")))
    smoothing = section["smoothing"]
    if smoothing["enabled"]:
        groups = smoothing["groups"]
        worst = max(groups, key=lambda g: g["outlier_ratio_before"], default=None)
        rows.append(("smoothing", f"{len(groups)} LayerNorm groups smoothed" + (
            f"; largest outlier ratio {worst['outlier_ratio_before']:.3g} → {worst['outlier_ratio_after']:.3g} "
            f"({escape(', '.join(worst['norms']))})" if worst else "")))
    outliers = section.get("outliers", {"tensors": []})
    if outliers["tensors"]:
        kinds = [t["handling"] for t in outliers["tensors"]]
        worst = min(outliers["tensors"], key=lambda t: t["estimated_db"])  # finite: below the threshold
        rows.append(("outliers", f"{len(kinds)} outlier tensors of {outliers['measured_tensors']} (estimated < "
                     f"{outliers['threshold_db']:g} dB at 8 bits): {kinds.count('equalized')} equalized, "
                     f"{kinds.count('float')} with float readers; worst {worst['estimated_db']:.1f} dB "
                     f"({escape(worst['tensor'])}, {worst['handling']})"))
    ends = section.get("keep_float", {"chosen": []})
    if ends["chosen"]:
        rows.append(("keep_float", escape(ends["why"])))
    corrected = section["bias_correction"]
    if corrected["layers"] and not corrected["kept"]:
        rows.append(("bias_correction", escape(corrected["why"])))
    elif corrected["enabled"]:
        layers = [layer for layer in corrected["layers"] if layer["corrected_channels"]]
        worst = max(layers, key=lambda layer: layer["max_abs_shift"], default=None)
        kept = sum(layer["corrected_channels"] for layer in layers)
        channels = sum(layer["channels"] for layer in corrected["layers"])
        rows.append(("bias_correction", f"{len(layers)} biases corrected ({kept} of {channels} channels; the "
                     f"rest within {corrected['min_t']:g} standard errors of 0)" + (
            f"; largest shift {worst['max_abs_shift']:.3g} ({escape(worst['node'])})" if worst else "")))
    # on by default, yet nothing ran: quantize from a table reads no calibration data (report.json's `skipped`)
    rows += [(name, "skipped: needs calibration data (--data), not a calibration table")
             for name in ("bias_correction", "outliers", "keep_float") if section.get(name, {}).get("skipped")]
    if not rows:
        return []
    return ["", "## Algorithms", "", "| algorithm | what it changed |", "|---|---|",
            *(f"| {name} | {text} |" for name, text in rows)]
