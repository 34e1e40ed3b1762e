"""Reliability under signals, dead workers and hostile patterns (issue 16, C, D and E; docs/reliability.md)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import ROOT, fused, save_npy_folder
from qtool.errors import WorkerError
from qtool.search import api as search_api
from qtool.search.executor import LocalProcessExecutor
from test_tune import hostile_model


@pytest.fixture
def hostile(tmp_path):
    """The tune tests' MatMul chain whose layer 3 needs more than 8 bits: baseline fails its gate."""
    folder = tmp_path / "h"
    folder.mkdir()
    onnx.save(hostile_model(), folder / "model.onnx")
    rng = np.random.default_rng(1)
    save_npy_folder(folder / "calib", [rng.standard_normal((1, 16)) for _ in range(16)])
    save_npy_folder(folder / "eval", [rng.standard_normal((1, 16)) for _ in range(16)])
    (folder / "recipe.yaml").write_text(fused("version: 1\nvalidation:\n  gates: {min_sqnr_db: 12}\n"))  # a tiny model: see FUSED
    return folder


def tune(folder: Path, output: Path, **kwargs):
    return search_api.tune(folder / "model.onnx", folder / "calib", folder / "recipe.yaml", output,
                           validation_data=folder / "eval", latency_runs=0, **kwargs)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging the suite (the old worker pool waited forever for a dead worker)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def workers_of(pid: int) -> list[int]:
    """The pool's worker processes: the grandchildren of `pid` (children of the forkserver)."""
    def children(of: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{of}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
        return found

    return [grandchild for child in children(pid) for grandchild in children(child)]


# --- C. signals -------------------------------------------------------------------------------


def interrupt_at(wanted: str):
    def progress(stage, done, total):
        if stage == wanted:
            raise KeyboardInterrupt  # Ctrl-C at the first report of this stage
    return progress


@pytest.mark.parametrize("stage", ["calibrate", "tune"])  # set-up; the baseline trial, before it is written
def test_an_interrupt_before_the_first_best_keeps_the_earlier_results(hostile, tmp_path, stage):
    out = tmp_path / "tuned"
    out.mkdir()
    (out / "model.onnx").write_text("earlier run")
    (out / "report.json").write_text('{"schema_version": 1, "command": "tune"}')  # an earlier run's
    try:
        result = tune(hostile, out, overwrite=True, progress=interrupt_at(stage))
    except KeyboardInterrupt:
        result = None
    assert result is None or (result.interrupted and not result.written)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert (out / "model.onnx").read_text() == "earlier run"


def test_an_early_interrupt_creates_no_output_folder(hostile, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        tune(hostile, tmp_path / "tuned", progress=interrupt_at("calibrate"))
    assert not (tmp_path / "tuned").exists()


def test_sigterm_during_tune_exits_143_keeping_the_best(hostile, tmp_path):
    # 512 wide: the search and its timing last seconds after the first best is written (timing stops once
    # the ratio is tight, so --latency-runs alone no longer keeps a tiny model's trials busy)
    onnx.save(hostile_model(width=512), hostile / "model.onnx")
    rng = np.random.default_rng(1)
    for name in ("calib", "eval"):
        shutil.rmtree(hostile / name)
        save_npy_folder(hostile / name, [rng.standard_normal((1, 512)) for _ in range(16)])
    out = tmp_path / "tuned"
    process = subprocess.Popen([sys.executable, "-m", "qtool", "tune", str(hostile / "model.onnx"), "--recipe",
                                str(hostile / "recipe.yaml"), "--data", str(hostile / "calib"),
                                "--validation-data", str(hostile / "eval"), "--output", str(out), "--quiet",
                                "--latency-runs", "100000"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not (out / "report.json").exists() and time.monotonic() < end and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)  # into the search or its timing
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.startswith("Terminated: best so far kept in")
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and report["search"]["stop_reason"] == "terminated (SIGTERM)"
    assert not list(out.glob(".*qtool-tmp"))


# --- D. worker processes ----------------------------------------------------------------------


def test_a_killed_trial_worker_is_an_error_not_a_hang():
    with deadline(60), LocalProcessExecutor(2) as executor:
        with pytest.raises(WorkerError, match="a trial worker process died .*SIGKILL"):
            list(executor.map_unordered(signal.raise_signal, [signal.SIGKILL, signal.SIGKILL]))


def test_tune_with_a_killed_worker_stops_with_an_error_keeping_the_best_so_far(hostile, tmp_path):
    out = tmp_path / "tuned"
    killed = []

    def kill_the_workers(stage, done, total):
        if stage == "tune" and not killed:  # the baseline trial came back: kill the pool (the OOM killer)
            killed.extend(workers_of(os.getpid()))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with deadline(120), pytest.raises(WorkerError, match="trial worker process died.*best trial so far is kept"):
        tune(hostile, out, jobs=2, progress=kill_the_workers)
    assert killed
    report = json.loads((out / "report.json").read_text())
    assert report["final"] and report["chosen"]["trial"] == "recipe as given"
    assert report["search"]["stop_reason"].startswith("stopped: a trial worker process died")
    onnx.checker.check_model(onnx.load(out / "model.onnx"))
