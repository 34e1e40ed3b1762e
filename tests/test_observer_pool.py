"""Calibration with worker processes: the tables one process makes, outputs read in place, nothing left behind."""

from __future__ import annotations

import importlib
import os
import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import make_model, save_npy_folder
from qtool.calibration import worker_pool
from qtool.calibration.observers import OBSERVERS
from qtool.calibration.worker_pool import MAX_WORKERS, PARALLEL_MIN_BYTES, ObserverPool, SharedOutputs, worker_count
from qtool.errors import CalibrationError, DataError
from qtool.io.data import DataFolder, model_inputs
from qtool.numerics import QTYPES
from qtool.recipe.schema import CalibrationSpec
from qtool.runtime.session import make_session, run, with_outputs

TENSORS = ["x", "mm", "act"]
SAMPLE_BYTES = 16 * 64 * 4 * len(TENSORS)
calibrate_module = importlib.import_module("qtool.calibration.calibrate")  # `qtool.calibrate` is also the api function


def calibrate(model, folder, spec, monkeypatch, workers: int, budget: int):
    """With `workers` worker processes and runs of at most `budget` bytes (workers halve the module's)."""
    monkeypatch.setattr(calibrate_module, "MEMORY_BUDGET", budget * 2 if workers else budget)
    data = DataFolder(folder, model_inputs(model))
    spec = spec.model_copy(update={"workers": workers})
    return calibrate_module.calibrate(model, TENSORS, data, spec, QTYPES["uint8"], False)


@pytest.mark.parametrize("method, workers, budget", [
    *((method, 2, 3 * SAMPLE_BYTES) for method in sorted(OBSERVERS)),  # runs of 3 samples, a short last one
    ("entropy", 1, 10_000),  # one tensor per pass: a session per group
])
def test_workers_give_the_table_one_process_gives(tiny, monkeypatch, method, workers, budget):
    model, folder = tiny
    spec = CalibrationSpec(method=method, batch_size=16, percentile=99.9)
    alone = calibrate(model, folder, spec, monkeypatch, 0, budget)
    pooled = calibrate(model, folder, spec, monkeypatch, workers, budget)
    assert pooled.samples == alone.samples == 32
    assert pooled.ranges == alone.ranges  # ranges and summaries, drift included: exactly


def test_a_failed_calibration_leaves_no_shared_file(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    rng = np.random.default_rng(4)
    folder = save_npy_folder(tmp_path / "data", rng.normal(size=(6, 16, 64)))
    np.save(folder / "0004.npy", rng.normal(size=(16, 63)).astype(np.float32))  # does not fit x
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(worker_pool, "SHARED_FOLDER", str(shm))
    made = []
    real = SharedOutputs.__init__

    def recording(self, capacity):
        real(self, capacity)
        made.append(self)
        assert list(shm.iterdir()) == []  # unlinked as soon as made: a SIGKILL cannot leak it

    monkeypatch.setattr(SharedOutputs, "__init__", recording)
    with pytest.raises(DataError, match="0004.npy"):
        calibrate(model, folder, CalibrationSpec(method="entropy", batch_size=1), monkeypatch, 1, 10**6)
    assert made and all(shared.fd == -1 for shared in made)


def test_shared_outputs_learn_the_shapes_a_prediction_got_wrong():
    """A mean over the batch does not grow with it: ORT refuses the predicted shape, a plain run
    teaches the real one, and the next run of that size is written in place."""
    model = make_model(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1), helper.make_node("Relu", ["x"], ["r"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4])],
        {},
    )
    exposed = with_outputs(model, ["mean", "r", "x"])
    session, reference = make_session(exposed, optimize=False, pooled=True), make_session(exposed, optimize=False)
    plain_runs = []
    session_run = session.run
    session.run = lambda *args: plain_runs.append(1) or session_run(*args)
    shared = SharedOutputs(capacity=64)
    try:
        shared.use(session)
        rng = np.random.default_rng(5)
        for rows in (1, 3, 3, 1):
            feeds = {"x": rng.normal(size=(rows, 4)).astype(np.float32)}
            got = shared.run(feeds)
            want = run(reference, feeds)
            assert set(got) == set(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
            del got
        # plain: the first one-row run (nothing known), the first three-row run (mispredicted);
        # the second three-row run and the last one-row run were written in place.
        assert len(plain_runs) == 2
    finally:
        shared.close()
    assert shared.fd == -1 and shared.map is None


def test_tensors_another_observer_watches_here_stay_in_this_process():
    specs = {name: (CalibrationSpec(method="minmax"), QTYPES["uint8"], False, None) for name in TENSORS}
    with ObserverPool(specs, {"x": 10.0, "mm": 8.0, "act": 1.0}, workers=1, pinned={"x": 10.0}) as pool:
        assert set(pool.local) == {"x"} and pool.remote == [{"mm", "act"}]  # the lighter lane, largest first
        assert set(pool.results()) == set(TENSORS)


def test_auto_starts_workers_only_for_enough_histogram_work():
    assert worker_count(3, 0.0) == 3  # asked for: started
    assert worker_count("auto", PARALLEL_MIN_BYTES - 1) == 0
    assert worker_count("auto", PARALLEL_MIN_BYTES) == min(len(os.sched_getaffinity(0)) - 1, MAX_WORKERS)


def test_a_worker_that_dies_is_an_error_not_a_hang():
    specs = {name: (CalibrationSpec(method="entropy"), QTYPES["uint8"], False, None) for name in TENSORS}
    with ObserverPool(specs, {name: 1.0 for name in TENSORS}, workers=1) as pool:
        pool.workers[0].kill()  # as the kernel's OOM killer would
        with pytest.raises(CalibrationError, match="worker process exited"):
            pool.results()


def test_a_killed_calibration_worker_is_named_not_a_broken_pipe():
    specs = {name: (CalibrationSpec(method="minmax"), QTYPES["uint8"], False, None) for name in ("x", "y")}
    with pytest.raises(CalibrationError, match="a calibration worker process exited \\(code -9\\)"):
        with ObserverPool(specs, {"x": 1.0, "y": 1.0}, workers=1) as pool:
            pool.workers[0].kill()
            pool.workers[0].wait()
            pool.results()


def test_a_small_dev_shm_falls_back_to_one_process_with_a_note(tiny, tmp_path, monkeypatch):
    model, folder = tiny
    shm = tmp_path / "shm"
    shm.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; this test runs as an ordinary user here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(shm)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        monkeypatch.setattr(worker_pool, "SHARED_FOLDER", str(shm))
        data = DataFolder(folder, model_inputs(model))
        spec = CalibrationSpec(method="percentile", percentile=99.9, batch_size=8)
        alone = calibrate_module.calibrate(model, ["mm", "act"], data, spec, QTYPES["uint8"], False)
        pooled = calibrate_module.calibrate(model, ["mm", "act"], data, spec.model_copy(update={"workers": 2}),
                                            QTYPES["uint8"], False)
        assert list(shm.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=False)
    assert pooled.ranges == alone.ranges
    assert len(pooled.notes) == 1 and "ran in this process only" in pooled.notes[0]
    assert "No space left on device" in pooled.notes[0] and not alone.notes
