"""Same model, recipe and data → the same bytes: quantize twice, in two processes, and compare."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from conftest import ROOT, SAMPLE

# Fields that may differ between two identical runs: where things were, and how long they took.
VOLATILE = {"path", "latency", "seconds", "duration", "elapsed", "timestamp", "created"}


def stable(value):
    """The report without paths and timings."""
    if isinstance(value, dict):
        return {key: stable(item) for key, item in value.items()
                if not any(word in key.lower() for word in VOLATILE)}
    if isinstance(value, list):  # a timing gate's verdict is as volatile as the timing
        return [stable(item) for item in value
                if not (isinstance(item, dict) and any(word in str(item.get("name", "")) for word in VOLATILE))]
    return value


def run_quantize(output, hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}  # set/dict-order bugs show up across seeds
    result = subprocess.run(
        [sys.executable, "-m", "qtool", "quantize", str(SAMPLE / "model.onnx"), "--recipe",
         str(ROOT / "qtool" / "recipe" / "presets" / "int8.yaml"), "--data", str(SAMPLE / "calib"), "--validation-data",
         str(SAMPLE / "eval"), "--output", str(output), "-q"],
        capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr


def test_quantize_twice_gives_identical_model_and_figures(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_quantize(first, "1")
    run_quantize(second, "2")
    digest = [hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() for out in (first, second)]
    assert digest[0] == digest[1]
    reports = [stable(json.loads((out / "report.json").read_text())) for out in (first, second)]
    assert reports[0] == reports[1]
    assert reports[0]["validation"]["outputs"]  # the comparison kept the figures, not just the frame
