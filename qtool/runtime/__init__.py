"""ONNX Runtime sessions built one way for every stage: calibration, validation and checks all run
models through here, so session options and the kernels' quirks are decided in one place.

May import: qtool.errors, qtool.numerics, qtool.recipe, qtool.io.
"""
