"""Helping a user write a recipe: what `qtool inspect` says about a model, what `qtool init` writes,
and the published preprocessing of model families a file identifies.

May import: every package below it (errors, numerics, recipe, io, runtime, calibration, quantization).
"""
