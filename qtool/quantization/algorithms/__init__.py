"""Post-training algorithms around the plan, one module each: cross-layer equalization (on the prepared
float model, before calibration) and bias correction (on the weights, after the plan). Each is a switch
under the recipe's `quantization.algorithms` and says per layer what it changed.
"""
