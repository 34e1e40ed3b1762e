"""qtool: post-training quantization of ONNX models, from a YAML recipe to an integer model."""

__version__ = "0.1.0"

from qtool.api import CalibrateResult, CompareResult, QuantizeResult, calibrate, compare, inspect, quantize  # noqa: E402
from qtool.authoring.inspection import Inspection  # noqa: E402
from qtool.errors import QtoolError  # noqa: E402
from qtool.recipe.load import load_recipe  # noqa: E402
from qtool.recipe.schema import Recipe  # noqa: E402
from qtool.search.api import SensitivityResult, TuneResult, sensitivity, tune  # noqa: E402

__all__ = ["CalibrateResult", "CompareResult", "Inspection", "QtoolError", "QuantizeResult", "Recipe",
           "SensitivityResult", "TuneResult", "__version__", "calibrate", "compare", "inspect", "load_recipe",
           "quantize", "sensitivity", "tune"]
