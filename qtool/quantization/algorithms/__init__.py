"""Post-training algorithms around the plan, one module each: cross-layer equalization (on the prepared
float model, before calibration), smoothing and outlier handling (on the float model, before
calibration), per-tensor range choice, and bias correction (on the weights, after the plan). Each is a
switch under the recipe's `quantization.algorithms` (or `calibration.method`) and says per layer what it
changed.
"""
