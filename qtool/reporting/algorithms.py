"""The report's `algorithms` section: each post-training algorithm, whether it ran, and per layer what it changed."""

from __future__ import annotations

from dataclasses import asdict

from qtool.quantization.algorithms.bias_correction import BiasShift
from qtool.quantization.algorithms.equalization import EqualizedPair
from qtool.quantization.algorithms.smoothing import SmoothedGroup
from qtool.recipe.schema import Recipe


def algorithms_section(recipe: Recipe, equalized: list[EqualizedPair], smoothed: list[SmoothedGroup] | None,
                       corrected: list[BiasShift] | None) -> dict:
    """`smoothed` and `corrected` are None where the algorithm was asked for but could not run (no
    calibration data) or was not asked for."""
    switches = recipe.quantization.algorithms
    return {
        "equalization": {"enabled": switches.equalization, "pairs": [asdict(pair) for pair in equalized]},
        "smoothing": {"enabled": switches.smoothing and smoothed is not None,
                      "groups": [{**asdict(group), "norms": list(group.norms), "readers": list(group.readers)}
                                 for group in smoothed or []]},
        "bias_correction": {"enabled": switches.bias_correction and corrected is not None,
                            "layers": [asdict(shift) for shift in corrected or []]},
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
    corrected = section["bias_correction"]
    if corrected["enabled"]:
        layers = corrected["layers"]
        worst = max(layers, key=lambda layer: layer["max_abs_shift"], default=None)
        rows.append(("bias_correction", f"{len(layers)} biases corrected" + (
            f"; largest shift {worst['max_abs_shift']:.3g} ({escape(worst['node'])})" if worst else "")))
    if not rows:
        return []
    return ["", "## Algorithms", "", "| algorithm | what it changed |", "|---|---|",
            *(f"| {name} | {text} |" for name, text in rows)]
