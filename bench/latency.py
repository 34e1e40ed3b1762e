"""Benchmark: latency of float, qtool int8 and onnxruntime.quantization int8, same model and data.

For every model in ../shared/models and sample_models/: qtool quantizes it with the preset <name> (qtool/recipe/presets/)
when there is one (else the built-in default recipe), onnxruntime.quantization's quantize_static
(QDQ, uint8 activations, int8 weights, per-channel, minmax) quantizes the same prepared float model
(opset >= 13, so per-channel is valid) on the same calibration samples. "float" is that prepared
model (BatchNorm and constant Mul/Add folded, as ORT's optimizer would; initializers listed as graph
inputs dropped, which some files need to run without feeding them). Then the three run on one
ONNX Runtime thread, interleaved (the order rotates every round) on the first evaluation sample,
until `--rounds` or `--seconds` per model. Medians in ms; ratios are float / quantized (above 1:
faster than float). The ratios are the figures to trust on a shared machine: drift lands on all three.

    python bench/latency.py                 # or: make bench-latency
    python bench/latency.py --models ppocr_cls,digits_cnn --seconds 10
    python bench/latency.py --placement fast   # every model with quantization.placement: fast
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
CALIB_SAMPLES = 32


def model_folders() -> dict[str, Path]:
    folders = {}
    for parent in (SHARED, ROOT / "sample_models"):
        for folder in sorted(parent.iterdir()) if parent.is_dir() else ():
            if (folder / "model.onnx").is_file() and (folder / "calib").is_dir():
                folders[folder.name] = folder
    return folders


def recipe_for(name: str, placement: str | None = None):
    from qtool.recipe.load import load_recipe
    from qtool.recipe.schema import Recipe

    path = ROOT / "qtool" / "recipe" / "presets" / f"{name}.yaml"
    recipe = load_recipe(path) if path.is_file() else Recipe()
    calibration = recipe.calibration.model_copy(update={"samples": CALIB_SAMPLES})
    validation = recipe.validation.model_copy(update={"gates": {}, "samples": 8})
    quantization = recipe.quantization.model_copy(update={"placement": placement}) if placement else recipe.quantization
    return recipe.model_copy(update={"calibration": calibration, "validation": validation, "quantization": quantization})


def ort_quantize(prepared, feeds: list[dict], folder: Path):
    """onnxruntime.quantization's quantize_static on qtool's prepared float model (opset >= 13)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    source, target = folder / "float.onnx", folder / "ort.onnx"
    onnx.save_model(prepared, str(source))
    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(target))


def time_interleaved(models: dict, feeds: dict, rounds: int, seconds: float) -> dict[str, float]:
    """Median ms per model; each round runs every model once, the order rotating round to round."""
    from qtool.runtime.session import make_session

    sessions = {name: make_session(model, threads=1) for name, model in models.items()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feeds)
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            began = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - began)
        if i >= 9 and time.perf_counter() - started > seconds:
            break
    return {name: float(np.median(values) * 1e3) for name, values in times.items()}


def bench_model(name: str, folder: Path, rounds: int, seconds: float, placement: str | None = None) -> dict:
    import qtool
    from qtool.api import prepare
    from qtool.io.data import DataFolder, model_inputs

    recipe = recipe_for(name, placement)
    images = recipe.data.images if recipe.data else None
    result = qtool.quantize(folder / "model.onnx", folder / "calib", recipe, validation_data=folder / "eval")
    prepared, _ = prepare(folder / "model.onnx", recipe)
    inputs = model_inputs(prepared)
    calib = [batch.feeds for batch in DataFolder(folder / "calib", inputs, CALIB_SAMPLES, images=images).batches(1)]
    feeds = next(DataFolder(folder / "eval", inputs, 1, images=images).batches(1)).feeds
    models = {"float": prepared, "qtool": result.model}
    row = {"model": name}
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as work:
        try:
            models["ort"] = ort_quantize(prepared, calib, Path(work))
        except Exception as exc:  # noqa: BLE001 - ORT's quantizer fails on some models: say so, time the rest
            row["ort_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        try:
            ms = time_interleaved(models, feeds, rounds, seconds)
        except Exception as exc:  # noqa: BLE001 - e.g. ORT's model does not load
            row["ort_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            models.pop("ort", None)
            ms = time_interleaved(models, feeds, rounds, seconds)
    row.update({f"{key}_ms": value for key, value in ms.items()})
    row["qtool_speedup"] = ms["float"] / ms["qtool"]
    if "ort" in ms:
        row["ort_speedup"] = ms["float"] / ms["ort"]
    row["kept_float_by_placement"] = sum(n["reason"].startswith("placement") for n in result.report["plan"]["nodes"])
    return row


def main() -> int:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's pre-processing advice, every model
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's "Removing initializer ..." lines, dozens a model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated folder names (default: every model found)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing budget per model")
    parser.add_argument("--placement", choices=["fused", "fast", "all"],
                        help="quantization.placement for every model (default: each preset's own)")
    args = parser.parse_args()
    folders = model_folders()
    wanted = args.models.split(",") if args.models else list(folders)
    print(f"{'model':<18} {'float ms':>9} {'qtool ms':>9} {'ORT ms':>9} {'qtool x':>8} {'ORT x':>7}  note")
    for name in wanted:
        if name not in folders:
            print(f"{name:<18} not found (have: {', '.join(folders)})")
            continue
        try:
            row = bench_model(name, folders[name], args.rounds, args.seconds, args.placement)
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the run
            print(f"{name:<18} qtool failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
            if "--debug" in sys.argv:
                traceback.print_exc()
            continue
        ort_ms = f"{row['ort_ms']:9.3f}" if "ort_ms" in row else f"{'-':>9}"
        ort_x = f"{row['ort_speedup']:7.2f}" if "ort_speedup" in row else f"{'-':>7}"
        note = row.get("ort_error", "")
        if row["kept_float_by_placement"]:
            note = f"placement kept {row['kept_float_by_placement']} node(s) float. " + note
        print(f"{name:<18} {row['float_ms']:9.3f} {row['qtool_ms']:9.3f} {ort_ms} {row['qtool_speedup']:8.2f} "
              f"{ort_x}  {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
