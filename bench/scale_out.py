"""Benchmark: `qtool sensitivity` on ppocr_det in one process, two local processes, and two Ray nodes.

Ray runs on a local cluster started here the way tests/test_ray.py starts one (a head and a second
node on 127.0.0.1, one CPU each, `ray start --block`, token authentication), so every figure comes
from the same two cores. Per configuration: wall time, the trial phase (wall minus the shared
calibration and float run), trials/s, and the slot-seconds each trial costs (slots x trial phase /
trials); Ray's overhead per trial is its figure minus that of two local processes (the same two
slots, one ONNX Runtime thread each). Then, on paper from those figures: a 1,000-node model
(trials and setup assumed to cost 1000/N times as much, N this model's nodes; the overhead per
trial as measured) on 8 and 64 one-slot nodes.

    python bench/scale_out.py               # or: make bench-scale-out (~10 min on 2 shared cores)
    python bench/scale_out.py --samples 1 --json out/scale-out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "ppocr_det"
RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """A head and a second node on 127.0.0.1, one CPU each, stopped by ending the two `ray start` processes."""

    def __init__(self, folder: Path):
        self.folder, self.processes = folder, []
        token = folder / "auth_token"
        token.write_text(os.urandom(16).hex())
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
        self.address = f"127.0.0.1:{free_port()}"

    def __enter__(self) -> "LocalCluster":
        common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats", "--block",
                  "--node-ip-address=127.0.0.1", f"--temp-dir={self.folder / 'ray'}"]
        port = self.address.rsplit(":", 1)[1]
        self._start("head", ["--head", f"--port={port}", "--include-dashboard=false", *common])
        self._start("node", [f"--address={self.address}", *common])
        return self

    def _start(self, name: str, args: list[str]) -> None:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            self.processes.append(subprocess.Popen([str(RAY), "start", *args], stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.processes[-1].poll() is not None:
                raise SystemExit(f"ray start {name} failed:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            process.wait(timeout=60)


def run(label: str, slots: int, samples: int, calib: int, folder: Path, **executor) -> dict:
    from qtool.recipe.load import load_recipe
    from qtool.search import api

    recipe = load_recipe("ppocr_det")
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"samples": calib})})
    started = time.perf_counter()
    result = api.sensitivity(MODEL / "model.onnx", MODEL / "calib", recipe, folder / label,
                             validation_data=MODEL / "eval", samples=samples, cache=folder / f"{label}.cache.json",
                             **executor)
    wall = time.perf_counter() - started
    section = result.report["sensitivity"]
    trials = sum(1 for row in result.rows if row.get("rank") is not None)
    phase = section["wall_s"] - section["calibration_s"]
    return {"config": label, "slots": slots, "trials": trials, "wall_s": wall, "setup_s": section["calibration_s"],
            "trial_phase_s": phase, "trials_per_s": trials / phase, "slot_s_per_trial": slots * phase / trials,
            "shipped_bytes": section["executor"]["shipped_bytes"], "lost": len(section["executor"]["lost_trials"]),
            "ranking": [row["node"] for row in result.rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2, help="evaluation samples per trial (default 2)")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples (default 8)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtool-scale-out-") as tmp:
        folder = Path(tmp)
        rows.append(run("1 process", 1, args.samples, args.calib, folder, jobs=1))
        rows.append(run("2 local processes", 2, args.samples, args.calib, folder, jobs=2))
        with LocalCluster(folder) as cluster:
            rows.append(run("Ray, 2 nodes x 1 CPU", 2, args.samples, args.calib, folder, executor="ray",
                            ray_address=cluster.address))
    base, local = rows[0]["slot_s_per_trial"], rows[1]["slot_s_per_trial"]
    print(f"ppocr_det sensitivity, {rows[0]['trials']} trials, {args.samples} evaluation sample(s) each, "
          f"{args.calib} calibration samples\n")
    print("| configuration | slots | wall s | setup s | trial phase s | trials/s | slot-s per trial | "
          "vs 1 process | shipped | same ranking |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        row["overhead_s_per_trial"] = row["slot_s_per_trial"] - base
        print(f"| {row['config']} | {row['slots']} | {row['wall_s']:.1f} | {row['setup_s']:.1f} | "
              f"{row['trial_phase_s']:.1f} | {row['trials_per_s']:.2f} | {row['slot_s_per_trial'] * 1000:.0f} ms | "
              f"{row['overhead_s_per_trial'] * 1000:+.0f} ms | {row['shipped_bytes'] / 2**20:.1f} MiB | "
              f"{row['ranking'] == rows[0]['ranking']} |")
    ray_row, nodes = rows[-1], rows[0]["trials"]
    overhead = ray_row["slot_s_per_trial"] - local
    print(f"\nRay's overhead per trial vs 2 local processes: {overhead * 1000:+.0f} ms "
          f"({overhead / local:+.0%} of a trial's {local * 1000:.0f} ms)")
    scale = 1000 / nodes
    print(f"\nOn paper, a 1,000-node model (trials {scale:.1f}x as long as these, setup too), on one-slot nodes:")
    for count in (8, 64):
        per_trial = local * scale + overhead
        total = ray_row["setup_s"] * scale + 1000 * per_trial / count
        print(f"- {count} nodes: {total / 60:.1f} min (setup {ray_row['setup_s'] * scale / 60:.1f} min + "
              f"1000 trials x {per_trial:.2f} s / {count})")
    print(f"- 1 process: {(rows[0]['setup_s'] + 1000 * base) * scale / 60:.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
