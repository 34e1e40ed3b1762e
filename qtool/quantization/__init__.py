"""Quantization: function-preserving graph clean-up (prepare), the per-op rule table, the plan that
decides every Q/DQ and weight before anything changes, weight quantization, and the one graph
mutation that carries a plan out (qdq).

May import: qtool.errors, qtool.numerics, qtool.recipe, qtool.io, qtool.runtime, qtool.calibration.
"""
