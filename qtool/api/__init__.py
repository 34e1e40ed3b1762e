"""The single-model use cases as plain functions: quantize, calibrate, compare, inspect, init.

The CLI calls these; so can any Python program (`import qtool`). The search
use cases built on them (sensitivity, tune) live in `qtool.search.api`.
One module a use case: quantize, calibrate, compare, authoring (inspect, init);
common holds what they share (model preparation, the files a recipe reads).
"""

from qtool.api.authoring import InitResult, init_recipe, inspect
from qtool.api.calibrate import CalibrateResult, calibrate
from qtool.api.common import Progress, prepare, recipe_inputs, stage_progress
from qtool.api.compare import CompareResult, compare
from qtool.api.quantize import QuantizeResult, quantize

__all__ = ["CalibrateResult", "CompareResult", "InitResult", "Progress", "QuantizeResult", "calibrate",
           "compare", "init_recipe", "inspect", "prepare", "quantize", "recipe_inputs", "stage_progress"]
