"""Benchmark: memory of reading a large stacked .npy stays flat in its size.

Writes a sparse .npy of --gib GiB (float32 [rows, 16384]; the file takes no disk until read), a
model x [N, 16384] -> MatMul -> Relu, and runs `qtool calibrate --data big.npy` with
`calibration.samples: 16` in a child process; prints the child's peak RSS (getrusage) beside
the same run on a 16-row file, so the difference is what the size of the file costs.
The .npy is memory-mapped, the listing hash read in chunks: target < 400 MB.

    python bench/data_memory.py            # 1 GiB, samples: 16
    python bench/data_memory.py --gib 2 --samples 64
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 16384


def write_model(path: Path) -> None:
    weight = np.random.default_rng(0).normal(size=(WIDTH, 8)).astype(np.float32) / 128
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def write_sparse_npy(path: Path, rows: int) -> None:
    """A .npy header and a file truncated to its full size: sparse, zeros where never written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, WIDTH))
    array[: min(rows, 64)] = np.random.default_rng(1).normal(size=(min(rows, 64), WIDTH))  # some non-zero samples
    array.flush()
    del array


def peak_rss_mb(args: list[str]) -> float:
    """Run qtool in a child process; its peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"qtool failed (exit {result.returncode}): {result.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        print("note: a child before this one peaked higher; run cases separately for exact figures")
    return after / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=16)
    options = parser.parse_args()
    rows = int(options.gib * 2**30 / (WIDTH * 4))
    with tempfile.TemporaryDirectory(prefix="qtool-bench-data-") as folder:
        folder = Path(folder)
        write_model(folder / "model.onnx")
        (folder / "recipe.yaml").write_text(f"version: 1\ncalibration: {{samples: {options.samples}}}\n")
        figures = {}
        for name, count in (("small", options.samples), ("big", rows)):  # small first: ru_maxrss only grows
            write_sparse_npy(folder / f"{name}.npy", count)
            figures[name] = peak_rss_mb(["calibrate", str(folder / "model.onnx"), "--recipe", str(folder / "recipe.yaml"),
                                         "--data", str(folder / f"{name}.npy"), "--output", str(folder / f"{name}.json")])
            size = (folder / f"{name}.npy").stat().st_size / 2**30
            print(f"{name:5s} .npy {size:6.3f} GiB ({count} rows), samples: {options.samples}: "
                  f"peak RSS {figures[name]:.0f} MB")
        print(f"cost of the file's size: {figures['big'] - figures['small']:+.0f} MB (target: peak < 400 MB)")


if __name__ == "__main__":
    main()
