"""qtool: post-training quantization of ONNX models, from a YAML recipe to an integer model."""

__version__ = "0.1.0"

from qtool.api import QuantizeResult, quantize  # noqa: E402
from qtool.errors import QtoolError  # noqa: E402
from qtool.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["QtoolError", "QuantizeResult", "Recipe", "__version__", "load_recipe", "quantize"]
