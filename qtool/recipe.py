"""The recipe: a typed, validated YAML document that says how to quantize.

Errors name the file, the line and the dotted key, and say what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from qtool.errors import RecipeError

RECIPE_VERSION = 1


class _Strict(BaseModel):
    """Unknown keys are errors; records are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSpec(_Strict):
    method: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "minmax", description="How an observed distribution becomes a range."
    )
    percentile: Annotated[float, Field(gt=50.0, le=100.0)] = Field(
        99.99, description="Percentile kept by the `percentile` method."
    )
    moving_average: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0,
        description="minmax only: weight of the past in an exponential moving "
        "average of per-batch min/max (0 = plain running min/max).",
    )
    bins: Annotated[int, Field(ge=128, le=65536)] = Field(
        2048, description="Histogram bins for percentile, entropy and mse."
    )
    samples: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Use at most this many samples (default: all files)."
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        8, description="Samples per ONNX Runtime run."
    )


class ActivationSpec(_Strict):
    dtype: Literal["uint8", "int8"] = Field("uint8", description="Activation integer type.")
    symmetric: bool = Field(False, description="Zero point fixed at the middle of the type.")


class WeightSpec(_Strict):
    dtype: Literal["int8", "uint8"] = Field("int8", description="Weight integer type.")
    symmetric: bool = Field(True, description="Zero point fixed at 0 (int8) or 128 (uint8).")
    granularity: Literal["per_channel", "per_tensor"] = Field(
        "per_channel", description="One scale per output channel, or one per tensor."
    )
    reduce_range: Literal["auto", True, False] = Field(
        "auto",
        description="Store weights in 7 bits so that uint8 x int8 kernels without "
        "VNNI cannot saturate; `auto` decides from the host CPU.",
    )


class ExcludeSpec(_Strict):
    nodes: list[str] = Field(default_factory=list, description="Node-name regexes kept float.")
    op_types: list[str] = Field(default_factory=list, description="Op types kept float.")


class QuantizationSpec(_Strict):
    activations: ActivationSpec = ActivationSpec()
    weights: WeightSpec = WeightSpec()
    exclude: ExcludeSpec = ExcludeSpec()


Gate = Literal["min_cosine", "min_sqnr_db", "max_accuracy_drop", "min_top1_agreement"]


class ValidationSpec(_Strict):
    data: str | None = Field(
        None,
        description="Evaluation data folder, relative to the recipe file "
        "(default: the calibration data, with a warning that figures are optimistic).",
    )
    labels: str | None = Field(
        None,
        description="labels.txt (`file label` per line), relative to the recipe "
        "file (default: labels.txt inside the evaluation folder, if present).",
    )
    samples: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Evaluate at most this many samples."
    )
    gates: dict[Gate, float] = Field(
        default_factory=dict, description="Quality gates; a failed gate makes the exit code 1."
    )


Side = Annotated[int, Field(ge=1, le=65536)]


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65536


def _is_hw(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_side, value))


class ImageSpec(_Strict):
    """How an image file becomes a model input: decode → RGB → resize → crop → normalize → layout."""

    size: tuple[Side, Side] | None = Field(
        None,
        description="Final [H, W] after resize and crop (default: the model input's static "
        "height and width; needed when the model's are dynamic).",
    )
    resize: Side | tuple[Side, Side] | None = Field(
        None,
        description="Bilinear resize before the crop: an integer resizes the shorter side to it, "
        "keeping the aspect ratio; [H, W] resizes exactly; null (default) resizes exactly to `size`.",
    )
    crop: Literal["center", "none"] = Field(
        "center",
        description="`center` cuts the central `size` region out of the resized image; `none` "
        "keeps the resized image as it is.",
    )
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Axis order of the model input.")
    channels: Literal["RGB", "BGR"] = Field("RGB", description="Channel order of the model input.")
    scale: Annotated[float, Field(gt=0.0)] = Field(
        255.0, description="Pixel values (0-255) are divided by this first."
    )
    mean: list[float] = Field(
        [0.0],
        description="Subtracted after scaling: 3 values (in the order of `channels`) or 1 for all.",
    )
    std: list[Annotated[float, Field(gt=0.0)]] = Field(
        [1.0],
        description="Divides after the mean: 3 values (in the order of `channels`) or 1 for all.",
    )
    dtype: Literal["float32", "float16", "uint8"] = Field(
        "float32", description="Element type of the tensor; uint8 keeps the pixels as they are."
    )

    @field_validator("size", mode="before")
    @classmethod
    def _size_shape(cls, value: Any) -> Any:
        if value is None or _is_hw(value):
            return value
        raise ValueError("expected [H, W], two integers from 1 to 65536, or null")

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_shape(cls, value: Any) -> Any:
        if value is None or _is_side(value) or _is_hw(value):
            return value
        raise ValueError("expected an integer from 1 to 65536 (the shorter side), [H, W] or null")

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float]) -> list[float]:
        if len(value) not in (1, 3):
            raise ValueError(f"expected 1 or 3 values, got {len(value)}")
        return value

    @field_validator("dtype")
    @classmethod
    def _uint8_is_raw(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        raw = data.get("scale") == 1 and set(data.get("mean", [])) == {0} and set(data.get("std", [])) == {1}
        if value == "uint8" and not raw:
            raise ValueError("uint8 keeps pixel values as they are: set scale: 1, mean: [0], std: [1]")
        return value


class DataSpec(_Strict):
    images: ImageSpec | None = Field(
        None,
        description="Preprocessing for image files (.png .jpg .jpeg .bmp) in data folders of "
        "single-input models; needed when a data folder holds images.",
    )


class Recipe(_Strict):
    version: Literal[1] = Field(RECIPE_VERSION, description="Recipe format version.")
    calibration: CalibrationSpec = CalibrationSpec()
    data: DataSpec = Field(DataSpec(), description="How files in a data folder become model inputs.")
    quantization: QuantizationSpec = QuantizationSpec()
    validation: ValidationSpec = ValidationSpec()
    source: Path | None = Field(None, exclude=True, description="File the recipe came from.")

    def resolve_path(self, value: str | None) -> Path | None:
        """Paths in a recipe are relative to the recipe file, not the working dir."""
        if value is None:
            return None
        base = self.source.parent if self.source else Path.cwd()
        return (base / value).resolve()

    def as_dict(self) -> dict[str, Any]:
        """The recipe as resolved (defaults filled in), for reports."""
        return self.model_dump(mode="json", exclude={"source"})


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["properties"].pop("source", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qtool recipe"
    return schema


def load_recipe(path: str | Path | None) -> Recipe:
    """Read and validate a recipe file; `None` gives the default recipe."""
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Path) -> Recipe:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: not valid YAML: {problem}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections, e.g. `version: 1`")
    lines = _key_lines(root, (), {}, path)
    try:
        return Recipe.model_validate({**document, "source": path.resolve()})
    except ValidationError as exc:
        raise RecipeError(_describe(exc.errors()[0], path, lines)) from None


def _key_lines(node: yaml.Node | None, prefix: tuple, out: dict, path: Path) -> dict:
    """Map each key path to its 1-based line; reject duplicate keys on the way."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                where = ".".join(map(str, prefix + (key,)))
                raise RecipeError(
                    f"{path}:{key_node.start_mark.line + 1}: {where}: duplicate key"
                )
            seen.add(key)
            out[prefix + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, prefix + (key,), out, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[prefix + (index,)] = item.start_mark.line + 1
            _key_lines(item, prefix + (index,), out, path)
    return out


def _describe(error: dict, path: Path, lines: dict) -> str:
    loc = tuple(error["loc"])
    line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 1)
    key = ".".join(map(str, loc)) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(_allowed_keys(loc[:-1])))
        return f"{path}:{line}: {key}: unknown key; allowed here: {allowed}"
    if kind == "missing":
        return f"{path}:{line}: {key}: required key is missing"
    given = error.get("input")
    return f"{path}:{line}: {key}: {given!r} is not allowed: {error['msg'][0].lower()}{error['msg'][1:]}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        # `Spec | None`: the section's own keys are the allowed ones.
        model = next((arg for arg in getattr(model, "__args__", ()) if hasattr(arg, "model_fields")), model)
    fields = getattr(model, "model_fields", {})
    return [name for name in fields if name != "source"]
