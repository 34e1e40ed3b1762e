"""One image file becomes one model-ready array, preprocessed as the recipe's `data.images` says.

Order: decode (PNG, JPEG or BMP only, Pillow's decompression-bomb limit kept)
→ RGB → resize (bilinear) → crop → channel order → ÷ scale → (x − mean) ÷ std
→ layout → dtype. `mean` and `std` are per channel in the order of `channels`.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin  # noqa: F401  (see IMAGE_FORMATS)

from qtool.errors import DataError
from qtool.recipe.inputs import ImageSpec

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png")
# Decoders Pillow may use: a file named .png that is really another format is refused.
# Their plugins are imported above: with one of them missing, Image.open imports all of Pillow's
# plugins (0.04-0.15 s) at the first file.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP")

# What Pillow raises on malformed or hostile files; anything else is a bug.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, struct.error, zlib.error,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)


def image_size_for(spec: ImageSpec, shape: tuple) -> tuple[int, int] | None:
    """The final [H, W]: the recipe's `size`, else the model input's static H and W, else None."""
    if spec.size is not None:
        return tuple(spec.size)
    if len(shape) == 4:
        height, width = (shape[2], shape[3]) if spec.layout == "NCHW" else (shape[1], shape[2])
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
            return height, width
    return None


# Pillow's 16-bit grey modes: converting them to RGB clips every value above 255 (99.6 % of a
# typical 16-bit image's pixels). They are scaled by their real range instead: 0..65535 to 0..255.
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode_image(path: Path) -> Image.Image:
    """Decode fully into an RGB image, or a float image (mode F, 0..255) for a 16-bit grey one;
    malformed, truncated or too-large files are a DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                image.load()
                if image.mode in SIXTEEN_BIT_MODES:
                    pixels = np.asarray(image).astype(np.float32) * np.float32(255 / 65535)
                    return Image.fromarray(pixels, mode="F")
                return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({_reason(exc)})") from None


def image_dimensions(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding its pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                return image.height, image.width
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({_reason(exc)})") from None


GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # R, G, B


def preprocess_image(path: Path, spec: ImageSpec, size: tuple[int, int] | None) -> np.ndarray:
    """The image at `path` as one sample without a batch axis: [C, H, W] or [H, W, C] (C = 1 with
    channels GRAY, else 3); `spec.dtype`. Raises DataError naming the file when it cannot be read."""
    image = decode_image(path)
    image = _resize(image, spec, size, path)
    if spec.crop == "center":
        image = _center_crop(image, size, path)
    pixels = np.asarray(image)  # H, W, C in RGB
    if image.mode == "F":  # 16-bit grey, scaled to 0..255: grey in every channel, as RGB would have it
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
        if spec.dtype == "uint8":
            pixels = np.rint(pixels).astype(np.uint8)
    if spec.channels == "GRAY":  # one channel: ITU-R 601 luminance, as Pillow's convert("L") weighs it
        grey = pixels.astype(np.float32) @ np.asarray(GRAY_WEIGHTS, np.float32)
        pixels = (np.clip(np.rint(grey), 0, 255).astype(np.uint8) if spec.dtype == "uint8" else grey)[..., None]
    if spec.channels == "BGR":
        pixels = pixels[..., ::-1]
    if spec.dtype == "uint8":  # the recipe guarantees scale 1, mean 0, std 1
        array = pixels
    else:
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        array = (pixels.astype(np.float32) / np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array, dtype=np.dtype(spec.dtype))


def _resize(image: Image.Image, spec: ImageSpec, size: tuple[int, int] | None, path: Path) -> Image.Image:
    width, height = image.size
    if isinstance(spec.resize, int):
        # Shorter side to `resize`, the longer one scaled and truncated (as torchvision does).
        short, long = min(width, height), max(width, height)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        target = (new_short, new_long) if height <= width else (new_long, new_short)
    elif spec.resize is not None:
        target = tuple(spec.resize)
    elif size is not None:
        target = size
    else:
        raise DataError(f"{path}: data.images.size is needed (the model input has no static height "
                        "and width): set data.images.size or data.images.resize")
    if (height, width) == tuple(target):
        return image
    return image.resize((target[1], target[0]), Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: tuple[int, int] | None, path: Path) -> Image.Image:
    if size is None:
        raise DataError(f"{path}: crop: center needs data.images.size (the model input has no "
                        "static height and width)")
    width, height = image.size
    crop_h, crop_w = size
    if height < crop_h or width < crop_w:
        raise DataError(f"{path}: resized to {height}x{width}, smaller than data.images.size "
                        f"{crop_h}x{crop_w}: cannot center-crop; raise data.images.resize")
    if (height, width) == (crop_h, crop_w):
        return image
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
