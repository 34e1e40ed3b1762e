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
