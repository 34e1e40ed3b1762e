"""Sharded calibration (calibration/shards.py) without a cluster: an in-process executor runs the
shard tasks, so every method and corner (a first sample of zeros, moving averages, range drift)
is checked against the one-process `calibrate` here; tests/test_ray.py does it on a real cluster."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import matmul_chain, save_npy_folder
from qtool.calibration.calibrate import calibrate
from qtool.calibration.shards import calibrate_sharded
from qtool.io.data import DataFolder, model_inputs
from qtool.numerics import QTYPES
from qtool.recipe.schema import CalibrationSpec


class InProcessShards:
    """The executor seam as calibrate_sharded uses it, run here: `put` keeps the value itself."""

    remote = True

    def __init__(self, jobs: int):
        self.jobs = jobs

    def put(self, value):
        return value

    def map_unordered(self, fn, tasks):
        done = [(task, fn(task)) for task in tasks]
        yield from reversed(done)  # out of order, as a cluster may finish them


def tables(tmp_path, arrays, spec: CalibrationSpec, symmetric: bool, jobs: int = 2):
    model = matmul_chain(width=8, layers=2)
    data_dir = save_npy_folder(tmp_path / "data", arrays)
    data = DataFolder(data_dir, model_inputs(model))
    tensors = ["x", "m0", "r0", "m1", "r1"]
    qtype = QTYPES["int8" if symmetric else "uint8"]
    one = calibrate(model, tensors, data, spec, qtype, symmetric)
    sharded = calibrate_sharded(model, tensors, data, spec, qtype, symmetric, InProcessShards(jobs))
    return one, sharded


def same(one, sharded) -> None:
    assert sharded.samples == one.samples
    assert sharded.batching == one.batching
    for name, expected in one.ranges.items():
        assert sharded.ranges[name] == expected, name


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_sharded_tables_equal_one_process(tmp_path, method, symmetric):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_t(3, size=(1, 8)) * (1 + i / 4) for i in range(40)]
    same(*tables(tmp_path, arrays, CalibrationSpec(method=method, batch_size=3, workers=0), symmetric, jobs=3))


def test_a_first_sample_of_zeros_reobserves_the_shards_with_one_unit(tmp_path):
    """Sample 0 all zeros fixes no histogram unit: the first shard that sees values fixes it, and
    shards that fixed another are observed again with it."""
    rng = np.random.default_rng(4)
    arrays = [np.zeros((1, 8))] + [rng.normal(size=(1, 8)) * (1 + i) for i in range(30)]
    same(*tables(tmp_path, arrays, CalibrationSpec(method="entropy", batch_size=2, workers=0), False))


def test_moving_average_minmax_replays_the_runs_in_order(tmp_path):
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=(1, 8)) * (1 + (i % 7)) for i in range(25)]
    same(*tables(tmp_path, arrays, CalibrationSpec(method="minmax", moving_average=0.9, batch_size=2, workers=0),
                 False))
