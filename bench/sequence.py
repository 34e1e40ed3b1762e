"""Benchmark: transformer and audio models, qtool's dynamic and static int8 beside onnxruntime.quantization's
quantize_dynamic (per-tensor and per-channel, int8 weights), on the same evaluation data.

Per model and variant: output SQNR (dB, signal and noise summed over the evaluation samples; for
albert_ja_pos the logits at /model/predictions/decoder/Add_output_0, added as an output, since the
model's own output is an int64 ArgMax), the task metric from eval/truth.txt (albert: character tag
accuracy; pyannote_seg3: frame speech-activity and speaker-count accuracy; speech_embedding:
leave-one-out 1-NN command accuracy, all as tools/devmodels computes them), the integer kernels ONNX
Runtime runs, and the latency ratio vs float (one ONNX Runtime thread, models interleaved round by
round, medians; below 1 is faster). quantize_dynamic runs on the model as shipped (what its users do).

    python bench/sequence.py                    # or: make bench-sequence
    python bench/sequence.py --models albert_ja_pos --json out/sequence.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
sys.path.insert(0, str(ROOT))

MODELS = {
    "albert_ja_pos": {"tap": "/model/predictions/decoder/Add_output_0", "metric": "tags",
                      "qtool": ["dynamic", "dynamic, layer 0 only", "static", "static+smoothing",
                                "static, outliers off", "static, keep_float auto"]},
    "speech_embedding": {"tap": None, "metric": "nn_command", "qtool": ["dynamic", "static", "static, outliers off",
                                                                        "static, keep_float auto"]},
    "pyannote_seg3": {"tap": None, "metric": "speakers", "qtool": ["dynamic"]},
}
KERNELS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLSTM", "ConvInteger",
           "QLinearMatMul", "QLinearConv", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QAttention"}
SECONDS = 6.0  # timing budget per model (all variants interleaved)


def load_feeds(folder: Path, session) -> tuple[list[str], list[dict]]:
    """Every .npy/.npz sample of `folder` as a feed dict, sorted by name."""
    inputs = session.get_inputs()
    names, feeds = [], []
    for path in sorted(folder.glob("*.np[yz]")):
        if path.suffix == ".npz":
            with np.load(path) as archive:
                feed = {key: archive[key] for key in archive.files}
        else:
            array = np.load(path)
            feed = {inputs[0].name: array if array.ndim == len(inputs[0].shape) else array[None]}
        names.append(path.name)
        feeds.append(feed)
    return names, feeds


def tapped(model_path: Path, tap: str | None, out: Path) -> Path:
    """The float model with `tap` added as its first output (unchanged when None)."""
    model = onnx.load(str(model_path))
    if tap:
        model.graph.output.insert(0, onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    onnx.save_model(model, str(out))
    return out


def qtool_variant(model_path: Path, folder: Path, kind: str, out: Path) -> Path:
    from qtool import api
    from qtool.recipe.load import load_recipe
    from qtool.recipe.schema import OverrideSpec

    recipe = load_recipe("dynamic-int8" if kind.startswith("dynamic") else "int8")
    quant = recipe.quantization
    if kind.endswith("smoothing"):
        quant = quant.model_copy(update={"algorithms": quant.algorithms.model_copy(update={"smoothing": True})})
    if kind.endswith("outliers off"):
        quant = quant.model_copy(update={"algorithms": quant.algorithms.model_copy(update={"outliers": "off"})})
    if kind.endswith("keep_float auto"):
        quant = quant.model_copy(update={"algorithms": quant.algorithms.model_copy(update={"keep_float": "auto"})})
    if kind.endswith("layer 0 only"):  # what quantize_dynamic covers: it cannot see the weights behind Identity
        later = {"match": {"name": ".*/(query|key|value|dense|ffn|ffn_output)_[123]/MatMul"}, "float": True}
        quant = quant.model_copy(update={"overrides": [OverrideSpec.model_validate(later)]})
    recipe = recipe.model_copy(update={
        "quantization": quant,
        "validation": recipe.validation.model_copy(update={"samples": 2, "gates": {}}),
        "calibration": recipe.calibration.model_copy(update={"samples": 32}),
    })
    data = None if kind.startswith("dynamic") else folder / "calib"
    result = api.quantize(model_path, data, recipe, validation_data=folder / "eval")
    onnx.save_model(result.model, str(out))
    return out


def ort_dynamic(model_path: Path, per_channel: bool, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(model_path), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
    return out


def kernels(path: Path) -> str:
    from qtool.runtime.session import optimized_op_histogram

    ops = optimized_op_histogram(onnx.load(str(path)))
    return ", ".join(f"{op}×{n}" for op, n in sorted(ops.items()) if op in KERNELS) or "none"


def sqnr(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - c) ** 2)) for r, c in zip(reference, candidate))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def _truth(folder: Path) -> dict[str, str]:
    rows = [line.split() for line in (folder / "eval" / "truth.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {name: value for name, value in rows}


def task_metric(kind: str, folder: Path, names: list[str], outputs: list[list[np.ndarray]]) -> str:
    """The model's task figure from its own outputs (`outputs[i]`: sample i's outputs, model order)."""
    truth = _truth(folder)
    if kind == "tags":  # the int64 ArgMax is the model's last output (the tap comes first)
        ok = total = 0
        for name, out in zip(names, outputs):
            reference = [int(v) for v in truth[name].split(",")]
            predicted = out[-1][0][: len(reference)]
            ok, total = ok + int(np.sum(predicted == reference)), total + len(reference)
        return f"tag acc {ok / total:.4f}"
    if kind == "speakers":
        to_count = np.array([0, 1, 1, 1, 2, 2, 2])
        vad = count = total = 0
        for name, out in zip(names, outputs):
            gt = np.array([int(c) for c in truth[name]])
            lp = out[0][0]
            vad += int((((1 - np.exp(lp[:, 0])) > 0.5) == (gt > 0)).sum())
            count += int((to_count[lp.argmax(1)] == gt).sum())
            total += len(gt)
        return f"VAD {vad / total:.4f}, count {count / total:.4f}"
    labels = np.array([int(truth[name]) for name in names])
    emb = np.stack([out[0].reshape(-1) for out in outputs])
    emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
    similarity = emb @ emb.T
    np.fill_diagonal(similarity, -np.inf)
    return f"1-NN {float((labels[similarity.argmax(1)] == labels).mean()):.4f}"


def time_interleaved(sessions: dict, feed: dict, seconds: float) -> dict[str, float]:
    """Median seconds per model; each round runs every model once, the order rotating round to round."""
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feed)
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for i in range(1000):
        for name in names[i % len(names):] + names[: i % len(names)]:
            began = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - began)
        if i >= 9 and time.perf_counter() - started > seconds:
            break
    return {name: float(np.median(values)) for name, values in times.items()}


def bench_model(name: str, seconds: float) -> list[dict]:
    from qtool.runtime.session import make_session

    spec, folder = MODELS[name], SHARED / name
    with tempfile.TemporaryDirectory(prefix="qtool-bench-sequence-") as tmp:
        tmp = Path(tmp)
        base = tapped(folder / "model.onnx", spec["tap"], tmp / "float.onnx")
        paths = {"float": base}
        refused = []
        for kind in spec["qtool"]:
            try:
                paths[f"qtool {kind}"] = qtool_variant(base, folder, kind, tmp / f"{kind}.onnx")
            except Exception as exc:  # a refused run is a row, not the end of the benchmark
                why = ("nothing to quantize (no MatMul, Gemm, LSTM or large Gather)" if "nothing to quantize" in str(exc)
                       else f"{type(exc).__name__}: {exc}")
                refused.append({"model": name, "variant": f"qtool {kind}", "refused": why})
        for per_channel in (False, True):
            label = f"ORT quantize_dynamic {'per-channel' if per_channel else 'per-tensor'}"
            paths[label] = ort_dynamic(base, per_channel, tmp / f"ort_{int(per_channel)}.onnx")
        sessions = {label: make_session(onnx.load(str(path)), threads=1) for label, path in paths.items()}
        names, feeds = load_feeds(folder / "eval", sessions["float"])
        outputs = {label: [session.run(None, feed) for feed in feeds] for label, session in sessions.items()}
        medians = time_interleaved(sessions, feeds[0], seconds)
        rows = list(refused)
        for label, path in paths.items():
            rows.append({
                "model": name, "variant": label,
                "sqnr_db": sqnr([o[0] for o in outputs["float"]], [o[0] for o in outputs[label]]),
                "task": task_metric(spec["metric"], folder, names, outputs[label]),
                "latency_ratio": medians[label] / medians["float"], "float_ms": medians["float"] * 1e3,
                "kernels": kernels(path), "samples": len(feeds),
            })
        return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | SQNR dB | task | latency vs float | integer kernels |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['model']} | {row['variant']} | — | refused: {row['refused']} | — | — |")
            continue
        shown = "—" if row["variant"] == "float" else f"{row['sqnr_db']:.1f}"
        lines.append(f"| {row['model']} | {row['variant']} | {shown} | {row['task']} | "
                     f"{row['latency_ratio']:.2f}× ({row['float_ms']:.1f} ms float) | {row['kernels']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seconds", type=float, default=SECONDS, help="timing budget per model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        if not (SHARED / name / "model.onnx").is_file():
            print(f"{name}: not found under {SHARED}, skipped", file=sys.stderr)
            continue
        rows += bench_model(name, args.seconds)
        print(markdown([r for r in rows if r["model"] == name]).split("\n", 2)[-1], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
