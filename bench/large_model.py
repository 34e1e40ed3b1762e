"""Benchmark: quantize a model past protobuf's 2 GB limit (weights in external data).

Generates a chain of MatMul → Relu layers whose float weights total more than 2 GB
(default 9 × 8192×8192 float32 = 2.42 GB) in a temporary folder, with a small
calibration folder, then runs `qtool quantize` on it in a child process and
prints wall time, the child's peak RSS (and its ratio to the model's size; the
target is under 2x), the phase whose memory peaked (VmRSS sampled every 10 ms),
and the sizes in and out. Not part of the tests: it needs ~6 GB of disk (the
model, qtool's working copy of its weights, the output) and ~5 GB of memory.
`--command` measures `qtool tune` (gate min_cosine 0.999, 4 trials, no timing),
`sensitivity` or `compare` (float model against the one `quantize` writes,
made first and not measured) instead; after the run it names any qtool work
folder (`qtool-*`) left in the child's TMPDIR.

    python bench/large_model.py [--width 8192] [--layers 9] [--samples 8] [--keep DIR] [--limit-mb N]
                                [--command quantize|tune|sensitivity|compare]

`--limit-mb` lowers qtool's protobuf limit in the child, so that a smaller model
(e.g. --width 4096 --layers 6, 0.40 GB, with --limit-mb 16) takes every large-model
path on a machine without the memory for the real one. It also prints the plan:
a model quantized like its small twin has every MatMul and Relu quantized.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper


# The child: `python -m qtool ...` with every qtool module's PROTOBUF_LIMIT set to argv[1] MB (0: unchanged);
# a thread samples VmRSS and, at each new high, which phase of qtool.api.quantize the main thread is in.
CHILD = """
import atexit, sys, threading, time
import qtool.api
import qtool.cli.main
limit = int(sys.argv[1]) << 20
for name, module in list(sys.modules.items()):
    if limit and name.startswith("qtool") and hasattr(module, "PROTOBUF_LIMIT"):
        module.PROTOBUF_LIMIT = limit
PHASES = {"_prepare": "load+prepare", "_measure_ranges": "calibrate", "plan_and_apply": "plan+quantize",
          "compare_models": "validate", "layers_and_latency": "latency", "optimized_op_histogram": "report",
          "write_artifacts": "write", "into_memory": "return"}
main, peak = threading.get_ident(), [0, "start"]
def sample():
    while True:
        rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
        if rss > peak[0]:
            frame, phase = sys._current_frames().get(main), None
            while frame is not None and phase is None:
                phase, frame = PHASES.get(frame.f_code.co_name), frame.f_back
            peak[:] = rss, phase or "other"
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
atexit.register(lambda: print(f"peak phase: {peak[1]} ({peak[0] / 2**20:.2f} GB sampled)", flush=True))
sys.argv = ["qtool", *sys.argv[2:]]
qtool.cli.main.main()
"""


def write_model(folder: Path, width: int, layers: int, op: str = "MatMul") -> Path:
    """Write the model with every weight as external data, one layer at a time in memory; `op` MatMul
    or Gemm (a Gemm layer is one bias correction corrects)."""
    rng = np.random.default_rng(0)
    nodes, initializers, previous = [], [], "x"
    data_file = folder / "model.onnx.data"
    offset = 0
    with open(data_file, "wb") as handle:
        for i in range(layers):
            weight = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            raw = weight.tobytes()
            handle.write(raw)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=weight.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_file.name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            offset += len(raw)
            initializers.append(tensor)
            nodes += [helper.make_node(op, [previous, f"w{i}"], [f"m{i}"], name=f"{op.lower()}{i}"),
                      helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
            previous = f"r{i}"
            del weight, raw
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", width])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


COMMANDS = ("quantize", "tune", "sensitivity", "compare")


def quantize_command(model: Path, data: Path, output: Path) -> list[str]:
    return ["quantize", str(model), "--data", str(data), "--output", str(output), "--overwrite", "-q"]


def write_recipe(folder: Path) -> Path:
    """The recipe tune searches with: the default quantization, a gate for it to meet."""
    path = folder / "recipe.yaml"
    path.write_text("version: 1\nvalidation:\n  gates: {min_cosine: 0.999}\n")
    return path


def _child(limit_mb: int | None, command: list[str], scratch: Path):
    """(exit code, rusage) of `qtool COMMAND` in a child whose TMPDIR is `scratch`."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(limit_mb or 0), *command],
                             env={**os.environ, "TMPDIR": str(scratch)})
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temp folder).")
    parser.add_argument("--op", choices=["MatMul", "Gemm"], default="MatMul", help="The layers' op type.")
    parser.add_argument("--limit-mb", type=int, help="qtool's protobuf limit in MB (default: protobuf's 2 GB).")
    parser.add_argument("--command", choices=COMMANDS, default="quantize", help="The qtool command measured.")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="qtool-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        model = write_model(folder, args.width, args.layers, args.op)
        data = folder / "calib"
        data.mkdir(exist_ok=True)
        rng = np.random.default_rng(1)
        for i in range(args.samples):
            np.save(data / f"{i:04d}.npy", rng.standard_normal((1, args.width), dtype=np.float32))
        size_in = model.stat().st_size + (folder / "model.onnx.data").stat().st_size
        print(f"model: {args.layers} x {args.op} {args.width}x{args.width}, {size_in / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - started:.1f} s)", flush=True)

        output = folder / "out"
        scratch = folder / "tmp"  # the child's TMPDIR: what qtool leaves there is seen
        scratch.mkdir(exist_ok=True)
        if args.command == "compare":  # the candidate, not measured
            _child(args.limit_mb, quantize_command(model, data, output), scratch)
        command = {"quantize": quantize_command(model, data, output),
                   "tune": ["tune", str(model), "--recipe", str(write_recipe(folder)), "--data", str(data),
                            "--output", str(output), "--overwrite", "--max-trials", "4", "--latency-runs", "0", "-q"],
                   "sensitivity": ["sensitivity", str(model), "--data", str(data), "--output", str(output / "sens"),
                                   "--overwrite"],
                   "compare": ["compare", str(model), str(output / "model.onnx"), "--data", str(data),
                               "--output", str(output / "compare"), "--overwrite", "-q"]}[args.command]
        started = time.perf_counter()
        code, usage = _child(args.limit_mb, command, scratch)
        seconds = time.perf_counter() - started
        print(f"qtool {args.command}: exit {code}, {seconds:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GB "
              f"= {usage.ru_maxrss * 1024 / size_in:.2f}x the model")
        left = sorted(path.name for path in scratch.iterdir() if path.name.startswith("qtool-"))
        print(f"left in TMPDIR: {', '.join(left) or 'nothing'}")
        if code in (0, 1) and args.command in ("quantize", "tune"):
            out_files = {p.name: p.stat().st_size for p in output.iterdir() if p.is_file()}
            print("output:", ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(out_files.items())))
            report = json.loads((output / "report.json").read_text())
            if args.command == "quantize":
                plan = report["plan"]
                print(f"plan: {plan['nodes_quantized']} of {2 * args.layers} nodes quantized, "
                      f"{plan['activations']} activations, float: {plan['float_by_reason'] or 'none'}")
            else:
                chosen = report["chosen"]
                print(f"tune: {report['search']['trials_run']} trial(s), chosen {chosen['trial']!r}, "
                      f"reproduced by quantize: {chosen.get('reproduced_by_quantize')}")
        sys.exit(code)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
