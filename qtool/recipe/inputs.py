"""The recipe's `data` section: how image, text and audio files become model inputs, and which
inputs carry a stateful model's state from one chunk of a stream to the next."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from qtool.recipe.strict import Strict


Side = Annotated[int, Field(ge=1, le=65536)]


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65536


def _is_hw(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_side, value))


class ImageSpec(Strict):
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
    channels: Literal["RGB", "BGR", "GRAY"] = Field(
        "RGB", description="Channel order of the model input; GRAY: one channel, the luminance "
        "(ITU-R 601: 0.299 R + 0.587 G + 0.114 B, as Pillow's mode L), for 1-channel models.")
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
    def _per_channel(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if info.data.get("channels") == "GRAY" and len(value) != 1:
            raise ValueError(f"expected 1 value with channels: GRAY, got {len(value)}")
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


TextRole = Literal["input_ids", "attention_mask", "token_type_ids"]
TEXT_ROLES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")


class TextSpec(Strict):
    """How lines of text become token inputs: tokenizer.json -> ids, mask and type ids, one sample a line."""

    tokenizer: str = Field(
        description="A Hugging Face `tokenizer.json`, relative to the recipe file (read with the `tokenizers` "
        "library: `pip install qtool-onnx[text]`)."
    )
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        None,
        description="Tokens per sample; longer texts are cut (truncation), shorter ones padded as `padding` "
        "says. Default: the model's fixed sequence length, else 128. Must equal a fixed length.",
    )
    padding: Literal["max_length", "none"] = Field(
        "max_length",
        description="`max_length` pads every sample to `max_length` with the tokenizer's pad token (needed "
        "when the model fixes the length); `none` keeps each sample's own length (one run per length).",
    )
    field: str = Field("text", description="`.jsonl` files: the key of each line's object that holds the text.")
    inputs: dict[str, TextRole] | None = Field(
        None,
        description="Model input name -> what it receives (`input_ids`, `attention_mask`, `token_type_ids`). "
        "Default: by the input's name (an input whose name contains one of these).",
    )


class AudioSpec(Strict):
    """How audio files become model inputs: decode -> mono -> resample -> scale -> chunks."""

    sample_rate: Annotated[int, Field(ge=1000, le=384000)] = Field(
        16000, description="Hz the model expects; files at another rate are resampled (soxr, high quality)."
    )
    chunk: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Samples per model input (the model's frame or window). Default: the one fixed "
        "dimension of the model input other than the batch that is not 1.",
    )
    hop: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Samples from one chunk's start to the next's (default: `chunk`, no overlap)."
    )
    last: Literal["pad", "drop"] = Field(
        "pad", description="A last chunk shorter than `chunk`: `pad` with zeros (silence), or `drop` it."
    )
    scale: Annotated[float, Field(gt=0.0)] = Field(
        1.0,
        description="Samples are read as floats in [-1, 1) and multiplied by this (32768: the int16 range "
        "some models expect).",
    )


class StateSpec(Strict):
    """Which inputs of a stateful model carry its state, fed back from outputs chunk after chunk."""

    carry: dict[str, str] = Field(
        description="State input name -> the output whose value it receives on the next chunk, e.g. "
        "`{h0: hn, c0: cn}`. Each data file (or audio file) is one stream, its samples the chunks in order.",
    )
    initial: str | None = Field(
        None,
        description="An `.npz` keyed by state input name with each stream's first state, relative to the "
        "recipe file (default: zeros of the input's declared shape, a symbolic batch taken as 1).",
    )

    @field_validator("carry")
    @classmethod
    def _not_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one state input and the output that carries it")
        return value


class DataSpec(Strict):
    images: ImageSpec | None = Field(
        None,
        description="Preprocessing for image files (.png .jpg .jpeg .bmp) in data folders of "
        "single-input models; needed when a data folder holds images.",
    )
    text: TextSpec | None = Field(
        None, description="Tokenization for text data: a `.txt` (one sample a line) or `.jsonl` file, or a "
        "folder of them.",
    )
    audio: AudioSpec | None = Field(
        None, description="Decoding and chunking for audio data: a folder of .wav (and, with soundfile, "
        ".flac .ogg) files, or one such file.",
    )
    state: StateSpec | None = Field(
        None, description="A stateful model: calibration and validation run each file as a stream, the "
        "state outputs fed back as the next chunk's state inputs.",
    )
