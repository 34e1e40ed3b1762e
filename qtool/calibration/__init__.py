"""Calibration: streaming observers (min/max, histograms and their range searches, Hessians for GPTQ)
fed by the calibration loop, optionally in worker processes or as shards on a Ray cluster (merged
exactly), giving a calibration table.

May import: qtool.errors, qtool.numerics, qtool.recipe, qtool.io, qtool.runtime, qtool.distributed.
"""
