"""Published preprocessing of model families that a model file identifies.

A model file does not say how pixels become its input, but some families do
say who made them (producer name, doc string) and what they compute (input
and output shapes). For those the authors' own preprocessing is public, and
`qtool init` writes it instead of a neutral default. Each entry names where
its values come from; an entry matches only on what the file itself shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from onnx import ModelProto

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Convention:
    """One family's input preprocessing; `size` is None where the family takes any H and W, and then
    `multiple` (when set) is what H and W must be multiples of (the network's coarsest stride)."""

    family: str
    source: str
    channels: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int] | None
    matches: Callable[[ModelProto], bool]
    multiple: int | None = None


def _dims(values) -> list[list]:
    """Each value's dims: an int where fixed, None where symbolic or unknown."""
    return [[d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
             for d in value.type.tensor_type.shape.dim] for value in values]


def _paddle_image_model(model: ModelProto) -> bool:
    """Exported by paddle2onnx (producer name, doc string or graph name says so), one 3-channel NCHW input."""
    made_by_paddle = any("PaddlePaddle" in text for text in (model.producer_name, model.doc_string, model.graph.name))
    initializers = {init.name for init in model.graph.initializer}
    inputs = _dims(value for value in model.graph.input if value.name not in initializers)
    return made_by_paddle and len(inputs) == 1 and len(inputs[0]) == 4 and inputs[0][1] == 3


def _outputs(model: ModelProto) -> list[list]:
    return _dims(model.graph.output)


def _is_ppocr_detector(model: ModelProto) -> bool:
    """DB text detector: one [N, 1, H, W] probability map."""
    outputs = _outputs(model)
    return _paddle_image_model(model) and len(outputs) == 1 and len(outputs[0]) == 4 and outputs[0][1] == 1


def _is_ppocr_classifier(model: ModelProto) -> bool:
    """Text-line orientation classifier: [N, 2] scores for 0° and 180°."""
    outputs = _outputs(model)
    return _paddle_image_model(model) and len(outputs) == 1 and outputs[0][1:] == [2]


def _is_ppocr_recogniser(model: ModelProto) -> bool:
    """CRNN/SVTR text recogniser: [N, T, vocabulary] per-step scores."""
    outputs = _outputs(model)
    return _paddle_image_model(model) and len(outputs) == 1 and len(outputs[0]) == 3


# PaddleOCR's inference scripts (tools/infer/predict_det.py, predict_cls.py, predict_rec.py) decode with
# OpenCV, so channels are BGR. The detector resizes H and W to multiples of 32 (its feature pyramid adds maps
# upsampled from 1/32 scale to those at 1/16, 1/8 and 1/4: any other size fails to broadcast in ONNX Runtime). The text-line models keep the aspect ratio and pad the width to the
# size given; qtool resizes to it exactly, which is the same for lines of that aspect.
_PPOCR = "PaddleOCR's tools/infer/predict_{}.py"

CONVENTIONS = (
    Convention("PaddleOCR text detector (DB)", _PPOCR.format("det") + ": BGR, x/255, ImageNet mean/std",
               "BGR", 255, IMAGENET_MEAN, IMAGENET_STD, None, _is_ppocr_detector, multiple=32),
    Convention("PaddleOCR text-line classifier", _PPOCR.format("cls") + ": BGR, x/255, mean/std 0.5, 48x192",
               "BGR", 255, (0.5,), (0.5,), (48, 192), _is_ppocr_classifier),
    Convention("PaddleOCR text recogniser", _PPOCR.format("rec") + ": BGR, x/255, mean/std 0.5, 48x320",
               "BGR", 255, (0.5,), (0.5,), (48, 320), _is_ppocr_recogniser),
)


def find_convention(model: ModelProto) -> Convention | None:
    """The first family whose signature the model shows, else None."""
    return next((convention for convention in CONVENTIONS if convention.matches(model)), None)
