"""Benchmark: qtool's calibration against onnxruntime.quantization's calibrator, same model, same data.

For minmax, percentile and entropy on each model of --models (default digits,ppocr_det; every model:
digits, ppocr_det, ppocr_cls, centerface, speech_embedding, u2netp (8 calibration and 4 validation
samples: ~0.5 s an image)), each case runs in its own child process. Wall time is measured from
outside (interpreter start and imports included: on the small models they are most of it); `call`
is the calibration call alone, timed inside the child after both sides' imports. Peak RSS is the
child's own (getrusage, which it reports as it ends) plus that of the calibration worker processes
it starts (VmHWM, read from /proc while they run), added whole: the file they share with the
child is counted in each, so the sum errs high; `grown` is that peak less the child's RSS before the
call (interpreter, numpy, ONNX Runtime and qtool imported: ~115 MB, most of the small models' peak; RSS
measured import by import: python 11, numpy 20, onnx 15, onnxruntime 30, pydantic 5, yaml + PIL + regex 5,
qtool's own modules 17, of which a calibrate run needs 15 (81 of its 101 modules: lazy imports would save
~2 MB). The ORT side imports the same, as it reads the data and prepares the model with qtool).
The ranges each side finds become a qtool calibration table (ORT's TensorsData converted), and the
same `qtool quantize --calibration` turns each into a model, so only the ranges differ; the table reports the validation figure (top-1
accuracy where the eval folder has labels.txt: digits, ppocr_cls; else the worst cosine of an
output to the float model's), no gates. Last, with ppocr_det, memory flatness: qtool
entropy on ppocr_det with 8 and with 64 samples (the images repeated).
pyannote_seg3 and albert_ja_pos are not cases yet.

    python bench/calibration.py            # or: make bench-calibration
    python bench/calibration.py --models ppocr_cls,centerface,speech_embedding,u2netp --methods minmax,entropy
    python bench/calibration.py --models ppocr_det --workers auto   # qtool with calibration.workers: auto
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99
BATCH = 8

INT8 = ROOT / "qtool/recipe/presets/int8.yaml"
# samples: calibration samples read by both sides (None: every file); eval_samples: validation samples
# for the figure (None: every file). u2netp runs ~0.5 s a 320x320 image, so it gets few of each.
MODELS = {
    "digits": {"model": ROOT / "sample_models/digits_cnn/model.onnx", "calib": ROOT / "sample_models/digits_cnn/calib",
               "eval": ROOT / "sample_models/digits_cnn/eval", "recipe": None, "figure": "accuracy"},
    "ppocr_det": {"model": SHARED / "ppocr_det/model.onnx", "calib": SHARED / "ppocr_det/calib",
                  "eval": SHARED / "ppocr_det/eval", "recipe": ROOT / "qtool/recipe/presets/ppocr_det.yaml", "figure": "cosine"},
    "ppocr_cls": {"model": SHARED / "ppocr_cls/model.onnx", "calib": SHARED / "ppocr_cls/calib",
                  "eval": SHARED / "ppocr_cls/eval", "recipe": ROOT / "qtool/recipe/presets/ppocr_cls.yaml",
                  "figure": "accuracy"},
    "centerface": {"model": SHARED / "centerface/model.onnx", "calib": SHARED / "centerface/calib",
                   "eval": SHARED / "centerface/eval", "recipe": INT8, "figure": "cosine"},
    "speech_embedding": {"model": SHARED / "speech_embedding/model.onnx", "calib": SHARED / "speech_embedding/calib",
                         "eval": SHARED / "speech_embedding/eval", "recipe": INT8, "figure": "cosine"},
    "u2netp": {"model": SHARED / "u2netp/model.onnx", "calib": SHARED / "u2netp/calib", "eval": SHARED / "u2netp/eval",
               "recipe": INT8, "figure": "cosine", "samples": 8, "eval_samples": 4},
}


def recipe_for(model: str, method: str, samples: int | None = None, workers: int | str = 0):
    from qtool.recipe.load import load_recipe

    base = load_recipe(MODELS[model]["recipe"])
    calibration = base.calibration.model_copy(update={"method": method, "percentile": PERCENTILE,
                                                       "batch_size": BATCH, "samples": samples, "workers": workers})
    return base.model_copy(update={"calibration": calibration})


# --- one case, in a child process -------------------------------------------------------------


def run_case(case: str, model: str, data: Path, out: Path, samples: int | None, workers: int | str) -> None:
    side, method = case.split("-", 1)
    spec = MODELS[model]
    recipe = recipe_for(model, method, samples, workers)
    import onnxruntime.quantization.calibrate  # noqa: F401  (imported before the clock starts, both sides)

    import qtool

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter, numpy, ORT, qtool
    start = time.perf_counter()
    if side == "qtool":
        qtool.calibrate(spec["model"], data, recipe, out, overwrite=True)
    else:
        ort_table(spec["model"], data, recipe, method, out)
    # Its own peak: wait4's would be the largest of it and the workers it started.
    # The calibration call alone (no interpreter start, no imports: on small models those dominate the wall).
    own_peak_file(out).write_text(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024} "
                                  f"{time.perf_counter() - start} {base}")


def own_peak_file(out: Path) -> Path:
    return out.with_name(out.name + ".rss")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                children = [int(p) for p in task.read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the peak RSS of the process since it started (its exec), not inherited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ort_table(model_path: Path, data: Path, recipe, method: str, out: Path) -> None:
    """ORT's calibrator on qtool's prepared model (so tensor names match), written as a qtool table."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    from qtool import __version__, api
    from qtool.calibration.calibrate import CalibrationTable, TensorRange
    from qtool.calibration.table_file import save_table, table_document
    from qtool.io.data import DataFolder, model_inputs
    from qtool.io.model import file_sha256

    onnxruntime.set_default_logger_severity(3)  # not dozens of 'Removing initializer' warnings a model
    model, _ = api.prepare(model_path)
    folder = DataFolder(data, model_inputs(model), recipe.calibration.samples, images=recipe.data.images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = folder.batches(BATCH)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else batch.feeds

    with tempfile.TemporaryDirectory(prefix="qtool-bench-ort-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared))
        kind = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy}[method]
        extra = {"percentile": PERCENTILE} if method == "percentile" else {}
        calibrator = create_calibrator(prepared, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=kind, extra_options=extra)
        calibrator.collect_data(Reader())
        tensors = calibrator.compute_data()
    ranges = {}
    for name, data_ in tensors.data.items():
        lo, hi = data_.range_value
        ranges[name] = TensorRange(float(lo.min()), float(hi.max()), f"ort-{method}")
    table = CalibrationTable(ranges, len(folder.files) if not recipe.calibration.samples
                             else min(len(folder.files), recipe.calibration.samples))
    save_table(table_document(table, model_path=model_path, model_sha256=file_sha256(model_path),
                              data=folder, recipe={"path": None, "resolved": recipe.as_dict()},
                              qtool_version=__version__), out)


# --- the orchestrator ---------------------------------------------------------------------------


def measure(case: str, model: str, data: Path, out: Path, samples: int | None = None, workers: str = "0") -> dict:
    """Run one case in a child; its wall time comes from outside, its workers' peak RSS from /proc
    (their ru_maxrss would start at the child's RSS when it started them)."""
    args = [sys.executable, __file__, "--case", case, "--model", model, "--data", str(data), "--out", str(out)]
    if samples:
        args += ["--samples", str(samples)]
    args += ["--workers", workers]
    start = time.perf_counter()
    child = subprocess.Popen(args, cwd=ROOT)
    workers: dict[int, float] = {}
    while True:
        done, status, _ = os.wait4(child.pid, os.WNOHANG)
        if done:
            break
        for pid in descendants(child.pid):
            workers[pid] = peak_rss_mb(pid) or workers.get(pid, 0.0)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"case {case} on {model} failed (exit {child.returncode})")
    own, call, base = (float(v) for v in own_peak_file(out).read_text().split())
    return {"wall_s": wall, "call_s": call, "peak_rss_mb": own + sum(workers.values()),
            "grown_mb": own - base + sum(workers.values()), "workers_rss_mb": sum(workers.values())}


def figure(model: str, table: Path, workdir: Path) -> float:
    """In a child too: a child's ru_maxrss starts at its parent's RSS (kept across fork and exec),
    so a parent grown by quantizing would set a floor under every later measurement."""
    args = [sys.executable, __file__, "--figure", str(table), "--model", model]
    return float(subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()[-1])


def compute_figure(model: str, table: Path) -> float:
    import qtool

    spec = MODELS[model]
    recipe = recipe_for(model, "minmax")
    # The figure only: validation on eval_samples, no gates (a latency gate would time both models).
    validation = recipe.validation.model_copy(update={"samples": spec.get("eval_samples"), "gates": {}})
    recipe = recipe.model_copy(update={"validation": validation})
    result = qtool.quantize(spec["model"], None, recipe, None, calibration=table,
                            validation_data=spec["eval"])
    validation = result.report["validation"]
    if spec["figure"] == "accuracy":
        return validation["accuracy"]["quantized"]
    return min(figures["cosine"] for figures in validation["outputs"].values())


def repeated_images(source: Path, count: int, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".png", ".jpeg", ".bmp"))
    for i in range(count):
        shutil.copy(files[i % len(files)], target / f"{i:04d}{files[i % len(files)].suffix}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="internal: run one case (e.g. qtool-entropy, ort-minmax) and exit")
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--figure", type=Path, help="internal: print the validation figure of a table and exit")
    parser.add_argument("--models", default="digits,ppocr_det",
                        help=f"comma-separated, of {','.join(MODELS)} (default: digits,ppocr_det)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all three)")
    parser.add_argument("--workers", default="0", help="qtool's calibration.workers: a number or auto (default 0)")
    args = parser.parse_args()
    if args.figure:
        print(compute_figure(args.model, args.figure))
        return
    if args.case:
        run_case(args.case, args.model, args.data, args.out, args.samples,
                 args.workers if args.workers == "auto" else int(args.workers))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            spec = MODELS[model]
            if not spec["model"].is_file():
                print(f"skip {model}: {spec['model']} not found", file=sys.stderr)
                continue
            for method in args.methods.split(","):
                result = {}
                for side in ("qtool", "ort"):
                    table = work / f"{model}-{side}-{method}.json"
                    result[side] = measure(f"{side}-{method}", model, spec["calib"], table, spec.get("samples"),
                                           workers=args.workers)
                    result[side]["figure"] = figure(model, table, work)
                    r = result[side]
                    print(f"{model:16} {side:5} {method:10} {r['wall_s']:7.1f} s (call {r['call_s']:6.1f} s) "
                          f"{r['peak_rss_mb']:8.0f} MB (grown {r['grown_mb']:6.0f} MB)  {spec['figure']} {r['figure']:.4f}",
                          file=sys.stderr, flush=True)
                rows.append((model, method, spec["figure"], result))
        flat = None
        det = MODELS["ppocr_det"]
        if "ppocr_det" in args.models and det["model"].is_file():
            many = repeated_images(det["calib"], 64, work / "det64")
            few = measure("qtool-entropy", "ppocr_det", many, work / "flat8.json", samples=8, workers=args.workers)
            lots = measure("qtool-entropy", "ppocr_det", many, work / "flat64.json", samples=64, workers=args.workers)
            flat = (few, lots)

    print()
    print("| model | method | qtool wall s | ORT wall s | wall qtool/ORT | call qtool/ORT | qtool peak RSS MB "
          "| ORT peak RSS MB | RSS qtool/ORT | grown qtool/ORT | figure | qtool | ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, method, name, r in rows:
        q, o = r["qtool"], r["ort"]
        print(f"| {model} | {method} | {q['wall_s']:.1f} | {o['wall_s']:.1f} | {q['wall_s'] / o['wall_s']:.2f} "
              f"| {q['call_s'] / o['call_s']:.2f} "
              f"| {q['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} | {q['peak_rss_mb'] / o['peak_rss_mb']:.2f} "
              f"| {q['grown_mb'] / o['grown_mb']:.2f} "
              f"| {name} | {q['figure']:.4f} | {o['figure']:.4f} |")
    if flat:
        few, lots = flat
        print(f"\nMemory flatness (qtool entropy, ppocr_det 320x320): 8 samples {few['peak_rss_mb']:.0f} MB, "
              f"64 samples {lots['peak_rss_mb']:.0f} MB: {lots['peak_rss_mb'] / few['peak_rss_mb']:.3f}x "
              f"(target <= 1.15x); wall {few['wall_s']:.1f} s vs {lots['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
