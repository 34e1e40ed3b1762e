"""The report's `algorithms` section: each post-training algorithm, whether it ran, and per layer what it changed."""

from __future__ import annotations

from dataclasses import asdict

from qtool.quantization.algorithms.bias_correction import BiasShift
from qtool.quantization.algorithms.equalization import EqualizedPair
from qtool.recipe.schema import Recipe


def algorithms_section(recipe: Recipe, equalized: list[EqualizedPair], corrected: list[BiasShift] | None) -> dict:
    """`corrected` is None where bias correction was asked for but could not run (no calibration data)."""
    switches = recipe.quantization.algorithms
    return {
        "equalization": {"enabled": switches.equalization, "pairs": [asdict(pair) for pair in equalized]},
        "bias_correction": {"enabled": switches.bias_correction and corrected is not None,
                            "layers": [asdict(shift) for shift in corrected or []]},
    }
