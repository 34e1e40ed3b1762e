"""The search use cases: sensitivity analysis (search/sensitivity.py) and accuracy-driven mixed
precision, `qtool tune` (search/tune.py); what the CLI and `import qtool` call."""

from qtool.search.sensitivity import SENSITIVITY_CACHE, SENSITIVITY_MODES, SensitivityResult, sensitivity
from qtool.search.tune import CONFIRM, LATENCY_RUNS, TUNED_RECIPE, TuneResult, tune, tuned_recipe_text

__all__ = ["CONFIRM", "LATENCY_RUNS", "SENSITIVITY_CACHE", "SENSITIVITY_MODES", "TUNED_RECIPE", "SensitivityResult",
           "TuneResult", "sensitivity", "tune", "tuned_recipe_text"]
