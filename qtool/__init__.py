"""qtool: post-training quantization of ONNX models, from a YAML recipe to an integer model.

The public API below is imported on first use (PEP 562): `import qtool` stays light, so the CLI's
entry (qtool.cli.launch) can catch a Ctrl-C that lands while numpy, onnx and ONNX Runtime load.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "CalibrateResult": "qtool.api", "CompareResult": "qtool.api", "QuantizeResult": "qtool.api",
    "calibrate": "qtool.api", "compare": "qtool.api", "inspect": "qtool.api", "quantize": "qtool.api",
    "Inspection": "qtool.authoring.inspection", "QtoolError": "qtool.errors", "load_recipe": "qtool.recipe.load",
    "Recipe": "qtool.recipe.schema", "SensitivityResult": "qtool.search.api", "TuneResult": "qtool.search.api",
    "sensitivity": "qtool.search.api", "tune": "qtool.search.api",
}

__all__ = ["CalibrateResult", "CompareResult", "Inspection", "QtoolError", "QuantizeResult", "Recipe",
           "SensitivityResult", "TuneResult", "__version__", "calibrate", "compare", "inspect", "load_recipe",
           "quantize", "sensitivity", "tune"]

if TYPE_CHECKING:
    from qtool.api import CalibrateResult, CompareResult, QuantizeResult, calibrate, compare, inspect, quantize
    from qtool.authoring.inspection import Inspection
    from qtool.errors import QtoolError
    from qtool.recipe.load import load_recipe
    from qtool.recipe.schema import Recipe
    from qtool.search.api import SensitivityResult, TuneResult, sensitivity, tune


def __getattr__(name: str) -> Any:
    """The public name `name`, imported from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'qtool' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
