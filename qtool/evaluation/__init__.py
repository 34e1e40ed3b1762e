"""Float vs quantized: per-output metrics and gates over the same feeds, per-layer errors, latency,
and the validate stage's choices (which data, what a kernel/simulation gap means).

May import: every package below it (errors, numerics, recipe, io, runtime, calibration, quantization).
"""
