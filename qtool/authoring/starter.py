"""A starter recipe for one model and data folder: every section written out and commented.

Only what the model and the files can tell is filled in (inputs, image size,
layout, and the preprocessing of a model family the file identifies, see
authoring/conventions.py); the rest (channel order, mean/std) comes from the caller or a
neutral default, and the text says which values the user must check.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from onnx import ModelProto
from pydantic import ValidationError

from qtool.authoring.conventions import Convention, find_convention
from qtool.authoring.sequences import TRANSFORMER_BASE, is_transformer, sequence_data_lines
from qtool.errors import UsageError
from qtool.io.data import DATA_SUFFIXES, InputSpec, model_inputs
from qtool.io.samples import integer_outputs
from qtool.io.images import IMAGE_SUFFIXES, image_dimensions
from qtool.recipe.inputs import ImageSpec
from qtool.recipe.load import recipe_path_text

SIZE_MULTIPLE = 32  # the coarsest stride of common CNN backbones (ResNet, MobileNet, DB heads)
SIZE_SAMPLE_LIMIT = 256  # image headers read to choose a size for dynamic H and W
SCHEMA_FILE = "qtool-recipe.schema.json"


@dataclass(frozen=True)
class ImageChoices:
    """Preprocessing the caller knows and qtool cannot read from the files; None: not given."""

    channels: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    size: tuple[int, int] | None = None

    def check(self) -> None:
        """Each given value as `data.images` would take it; raises UsageError (exit 2) naming the
        option (`--std 0`), not the recipe that would have held it."""
        for name in ("channels", "mean", "std", "scale", "size"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                ImageSpec.model_validate({name: list(value) if isinstance(value, tuple) else value})
            except ValidationError as exc:
                error = exc.errors()[0]
                shown = ",".join(f"{v:g}" for v in value) if name in ("mean", "std") else \
                    "x".join(map(str, value)) if name == "size" else f"{value:g}" if name == "scale" else value
                given = error.get("input")
                given = f"{given:g}" if isinstance(given, float) else repr(given)
                raise UsageError(f"--{name} {shown}: {given} is not allowed: "
                                 f"{error['msg'][0].lower()}{error['msg'][1:]} (it becomes data.images.{name})") \
                    from None


# What an image recipe holds when neither the caller nor a known model family says otherwise.
NEUTRAL_IMAGE = ImageChoices(channels="RGB", mean=(0.0,), std=(1.0,), scale=255)


def _family_defaults(convention: Convention | None) -> ImageChoices:
    if convention is None:
        return NEUTRAL_IMAGE
    return ImageChoices(convention.channels, convention.mean, convention.std, convention.scale, convention.size)


@dataclass(frozen=True)
class DataKind:
    kind: str  # "images", "arrays" or "none"
    images: tuple[Path, ...] = ()
    files: int = 0


def data_kind(folder: Path | None) -> DataKind:
    """What a data folder holds (its own files, else its class sub-folders' files)."""
    if folder is None or not folder.is_dir():
        return DataKind("none")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        files = sorted(p for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")
                       for p in sub.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        return DataKind("images", tuple(images), len(files))
    return DataKind("arrays" if files else "none", (), len(files))


def _layout(spec: InputSpec) -> str:
    shape = spec.shape
    if len(shape) == 4 and shape[1] not in (1, 3) and shape[3] in (1, 3):
        return "NHWC"
    return "NCHW"


def _static_hw(spec: InputSpec, layout: str) -> tuple[int, int] | None:
    if len(spec.shape) != 4:
        return None
    height, width = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height, width
    return None


def _round(side: int) -> int:
    return max(SIZE_MULTIPLE, round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def size_from_images(images: tuple[Path, ...]) -> tuple[tuple[int, int], str]:
    """A fixed [H, W] for a model with dynamic H and W, and how it was chosen.

    One size throughout: that size. Mixed sizes (and orientations): a square
    of the median shorter side, so that most images are shrunk, not blown up.
    Either way rounded to a multiple of SIZE_MULTIPLE.
    """
    sizes = [image_dimensions(path) for path in images[:SIZE_SAMPLE_LIMIT]]
    if len(set(sizes)) == 1:
        height, width = sizes[0]
        return (_round(height), _round(width)), f"every image is {height}x{width}"
    side = sorted(min(size) for size in sizes)[len(sizes) // 2]
    return (_round(side), _round(side)), f"square of the median shorter side ({side}) of {len(sizes)} images"


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


LATENCY_MARGIN = 0.9  # a measured ratio above it: the max_latency_ratio 1.0 gate fails here, or flaps with noise


@dataclass(frozen=True)
class MeasuredLatency:
    """What `qtool init` measured: the starter recipe's int8 model against float, median ms of `runs`
    interleaved runs on one ONNX Runtime thread."""
    ratio: float
    float_ms: float
    quantized_ms: float
    runs: int
    fast_keeps_all_float: bool = False  # placement fast kept every node float: the model timed is placed fused

    def warning(self) -> str:
        if self.fast_keeps_all_float:
            return ("`placement: fast` (the default) estimates every node this recipe quantizes faster as float "
                    "on ONNX Runtime's CPU kernels here, so `qtool quantize` with it refuses (exit 2: no 8-bit "
                    f"kernel pays); with `quantization.placement: fused` its int8 model ran at {self.ratio:.2f}x "
                    f"float's latency ({self.quantized_ms:.3g} ms against {self.float_ms:.3g} ms, median of "
                    f"{self.runs} interleaved runs, one thread): "
                    "ship the float model, or set placement fused (and measure on the target machine: "
                    "--provider, --threads)")
        return (f"the starter recipe's int8 model ran at {self.ratio:.2f}x float's latency here ({self.quantized_ms:.3g} "
                f"ms against {self.float_ms:.3g} ms, median of {self.runs} interleaved runs, one thread): above "
                f"{LATENCY_MARGIN}x, int8 gains little or nothing on this model with these kernels, so quantize "
                "with this recipe will likely fail its max_latency_ratio 1.0 gate on this machine (exit 1: a "
                "model slower than float is no model to ship); measure on the target machine (--provider, "
                "--threads), let `qtool tune` keep the slow nodes float, or ship the float model")


STARTER_MIN_COSINE = 0.9
STARTER_MIN_EXACT_MATCH = 0.95  # integer outputs (tags, class ids) of a static int8 starter


def starter_accuracy_drop(labelled: int) -> float:
    """1 point, or 2 samples' worth where the evaluation set is small (rounded up to 0.001)."""
    return max(0.01, math.ceil(2000 / labelled) / 1000)


def _label_count(folder: Path | None) -> int:
    path = folder / "labels.txt" if folder is not None else None
    if path is None or not path.is_file():
        return 0
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return 0


def check_size(model: ModelProto, size: tuple[int, int] | None) -> None:
    """Raise UsageError (exit 2) when `size` ([H, W], from --size) is not a multiple of what the model's
    family needs (PaddleOCR's detector: 32), naming the nearest sizes that are."""
    convention = find_convention(model)
    step = convention.multiple if convention is not None else None
    if size is None or step is None or not any(side % step for side in size):
        return
    lower = "x".join(str(max(step, side // step * step)) for side in size)
    upper = "x".join(str(-(-side // step) * step) for side in size)
    raise UsageError(f"--size {size[0]}x{size[1]}: the model is a {convention.family}, whose height and width "
                     f"must be multiples of {step} ({convention.source.split(':')[0]}); e.g. --size {lower} or "
                     f"--size {upper}")


def starter_recipe(
    model: ModelProto,
    model_path: Path,
    recipe_path: Path,
    data_dir: Path | None = None,
    validation_dir: Path | None = None,
    schema_ref: str = SCHEMA_FILE,
    image: ImageChoices = ImageChoices(),
    slow: MeasuredLatency | None = None,
) -> str:
    """The recipe text: YAML that `load_recipe` accepts as it is. `slow`: the int8 model measured slower
    than LATENCY_MARGIN x float: the comments say that its max_latency_ratio gate will likely fail here.
    Raises UsageError for an `image.size` the model family the file shows cannot take (check_size)."""
    check_size(model, image.size)
    inputs = model_inputs(model)
    base = recipe_path.parent
    transformer = is_transformer(model_path, data_dir, inputs)
    data = data_kind(data_dir)
    command = (f"qtool quantize {recipe_path_text(model_path, base)} --recipe {recipe_path.name} "
               f"--data {recipe_path_text(data_dir, base) if data_dir else 'CALIB_DIR'} --output out/")
    lines = [
        f"# yaml-language-server: $schema={schema_ref}",
        f"# qtool recipe for {model_path.name}, written by `qtool init`. Every key is optional;",
        "# values are qtool's defaults unless a comment says where they came from.",
        "# Lines marked CHECK hold defaults qtool could not read from the model or the data.",
        "# Field reference: docs/recipe.md, or `qtool schema` for the JSON Schema.",
        "#",
        "# Model inputs (from the model file):",
        *(f"#   {spec.describe()}" for spec in inputs),
        "#",
        "# Run it from this file's folder:",
        f"#   {command}",
        "version: 1",
        *(["# Token inputs: a transformer. Static int8 measured worse there (docs/recipe.md: albert_ja_pos",
           f"# 22.9 dB static, 31.6 dB dynamic); {TRANSFORMER_BASE} quantizes activations at run time.",
           f"base: {TRANSFORMER_BASE}"] if transformer else []),
        "",
        "calibration:",
        "  method: minmax          # minmax | percentile | entropy | mse | auto (per tensor, the least error)",
        "  # percentile: 99.99     # with method: percentile",
        "  batch_size: 8           # samples per ONNX Runtime run",
        "  # samples: 256          # use at most this many calibration files (default: all)",
        "",
    ]
    kind, sequence = sequence_data_lines(model, model_path, inputs, data_dir, base)
    if kind is not None:  # text or audio files: their section, and state where inputs look like it
        lines += ["data:", *sequence, ""]
    else:
        section = _data_section(inputs, data, image, find_convention(model))
        if sequence and section[0] == "data:":  # images and state
            section = [*section[:-1], *sequence, ""]
        elif sequence:
            section = [*section, "data:", *sequence, ""]
        lines += section
    labels = _label_count(validation_dir)
    kinds = set(integer_outputs(model))
    gates = [f"min_cosine: {0.99 if transformer else STARTER_MIN_COSINE}"] if False in kinds else []
    if True in kinds:  # tags, class ids: no cosine or SQNR, the fraction equal
        gates.append(f"min_exact_match: {0.99 if transformer else STARTER_MIN_EXACT_MATCH}")
    if labels:
        gates.append(f"max_accuracy_drop: {starter_accuracy_drop(labels)}")
    gates.append("max_latency_ratio: 1.0")
    lines += ["quantization:"]
    if transformer:
        lines += [f"  # mode: dynamic comes from {TRANSFORMER_BASE}; `mode: static` with `algorithms: {{smoothing: true}}`",
                  "  # tries static int8 (needs --data)."]
    else:
        lines += ["  activations: {dtype: uint8, symmetric: false}",
                  "  weights: {dtype: int8, symmetric: true, granularity: per_channel, reduce_range: auto}"]
    lines += [
        "  # Nodes to keep float; `qtool inspect MODEL --recipe THIS_FILE` lists every node and its fate.",
        "  exclude:",
        "    nodes: []             # node-name regexes, e.g. [\"/head/.*\"]",
        "    op_types: []          # e.g. [Softmax]",
        "",
        "validation:",
    ]
    if validation_dir is not None:
        where = recipe_path_text(validation_dir, base)
        lines.append(f"  data: {where}   # " + ("absolute: relative, it would climb to /" if where.startswith("/")
                                              else "relative to this file"))
    else:
        lines += ["  # Held-out data, relative to this file (default: the calibration data, and the",
                  "  # report warns that its figures are optimistic):",
                  "  # data: path/to/eval"]
    # validation.labels is relative to this file, like every path in it; labels.txt in validation.data is
    # read without it
    beside = recipe_path_text(validation_dir / "labels.txt", base) if validation_dir is not None \
        else "path/to/eval/labels.txt"
    lines += [
        "  # `file label` per line gives top-1 accuracy of both models; labels.txt in the data folder is",
        "  # read without this line (a path relative to this file, like every path here):",
        f"  # labels: {beside}",
        "  # A failed gate makes `qtool quantize` exit 1 (artifacts written, the report says which).",
        *(["  # The gates of base dynamic-int8 (gates merge with the base's): min_cosine for float outputs,",
           "  # min_exact_match for integer ones (text padding not scored)."] if transformer else
          [f"  # Starter gates a first int8 run can bear: min_cosine {STARTER_MIN_COSINE} fails a broken model",
           "  # (those fall far below) but not int8's ordinary loss on dense outputs (ppocr_det's",
           "  # probability map: 0.927); raise it to what your task keeps once the report shows it."]),
        *(["  # min_exact_match: the integer outputs (tags, class ids) agree on this fraction of elements."]
          if True in kinds and not transformer else []),
        *([f"  # max_accuracy_drop: 1 point, or 2 of the {labels} labelled samples where that is more",
           "  # (one sample more or less is noise)."] if labels else []),
        "  # max_latency_ratio 1.0: exit 1 when the quantized model runs slower than float here (median",
        "  # of interleaved runs, one ONNX Runtime thread); measure on the target with --provider/--threads.",
        *(["  # " + line for line in textwrap.wrap("Measured by `qtool init`: " + slow.warning(), 96)]
          if slow else []),
        f"  gates: {{{', '.join(gates)}}}",
    ]
    if not labels:
        lines.append("  # with labels: max_accuracy_drop: 0.01 (top-1 may drop at most 1 point)")
    return "\n".join(lines) + "\n"


def _data_section(inputs: list[InputSpec], data: DataKind, image: ImageChoices,
                  convention: Convention | None) -> list[str]:
    if data.kind != "images":
        what = {"arrays": f"holds {data.files} array files (.npy/.npz): fed as they are",
                "none": "was not given or holds no data files"}[data.kind]
        return [
            f"# The data folder {what}; image folders need a",
            "# data.images section saying how pixels become the input, e.g.:",
            "# data:",
            "#   images: {size: [224, 224], layout: NCHW, channels: RGB, scale: 255, mean: [0], std: [1]}",
            "",
        ]
    spec = inputs[0]
    layout = _layout(spec)
    static = _static_hw(spec, layout)
    lines = ["data:", "  images:"]
    if convention is not None:
        note = (f"The model shows the producer and input/output shapes of a {convention.family}, so values "
                f"not given as options follow {convention.source}.")
        lines += ["    # " + line for line in textwrap.wrap(note, 92)]
    if image.size is not None:
        lines.append(f"    size: [{image.size[0]}, {image.size[1]}]      # [H, W], as given")
    elif static is not None:
        lines.append(f"    size: [{static[0]}, {static[1]}]      # [H, W] from the model's static input dims")
    elif convention is not None and convention.size is not None:
        lines.append(f"    size: [{convention.size[0]}, {convention.size[1]}]      # [H, W] of the {convention.family}")
    else:
        size, how = size_from_images(data.images)
        note = (f"CHECK: the model's height and width are dynamic; this size comes from the data ({how}), "
                f"rounded to multiples of {SIZE_MULTIPLE}. Use the size your application feeds "
                "(`qtool init --size HxW`).")
        lines += ["    # " + line for line in textwrap.wrap(note, 92)] + [f"    size: [{size[0]}, {size[1]}]"]
    lines += [
        "    resize: null          # null: resize exactly to size (aspect not kept); N: shorter side to N",
        "    crop: none            # none | center (cut size out of the resized image)",
        f"    layout: {layout}          # from the model's input shape",
    ]
    known = _family_defaults(convention)
    grey = len(spec.shape) == 4 and spec.shape[1 if layout == "NCHW" else 3] == 1
    channels = image.channels or ("GRAY" if grey and convention is None else known.channels)
    if image.channels is None and convention is None:
        lines.append("    # GRAY: the model's input has one channel (images become their luminance)." if grey else
                     "    # CHECK: RGB is a default; use the channel order your model was trained on.")
    lines.append(f"    channels: {channels}         # RGB | BGR | GRAY")
    scale = image.scale if image.scale is not None else known.scale
    lines.append(f"    scale: {scale:g}            # pixels (0-255) are divided by this first")
    if (image.mean is None or image.std is None) and convention is None:
        lines.append("    # CHECK: mean/std below are neutral defaults (x/scale only): use your training's")
        lines.append("    # normalisation, per channel in the order of `channels`.")
    lines.append(f"    mean: {_floats(image.mean or known.mean)}")
    lines.append(f"    std: {_floats(image.std or known.std)}")
    lines += ["    dtype: float32", ""]
    return lines
