"""Data folders: arrays and images, preprocessing numerics, order, limits, hostile files, labels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from qtool.errors import DataError, RecipeError
from qtool.io.data import DataFolder, InputSpec, read_labels
from qtool.recipe.load import load_recipe, parse_recipe
from qtool.recipe.inputs import ImageSpec

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"

F32 = np.dtype(np.float32)


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _one_sample(folder: Path, spec: ImageSpec, shape: tuple, dtype: np.dtype = F32) -> np.ndarray:
    data = DataFolder(folder, [InputSpec("x", np.dtype(dtype), shape)], images=spec)
    (name, feeds), = list(data.samples())
    return feeds["x"]


# --- preprocessing numerics against hand computations -----------------------------------------

def test_crop_channels_layout_mean_std_match_a_hand_computation(tmp_path):
    pixels = _pixels(6, 8)
    _png(tmp_path / "a.png", pixels)
    spec = ImageSpec(size=(4, 4), resize=6, crop="center", layout="NCHW", channels="BGR",
                     scale=255, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    got = _one_sample(tmp_path, spec, (None, 3, 4, 4))
    # shorter side already 6: no resize; centre 4x4 of 6x8 = rows 1..4, columns 2..5
    crop = pixels[1:5, 2:6, ::-1].astype(np.float64)  # BGR
    want = ((crop / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]).transpose(2, 0, 1)[np.newaxis]
    assert got.dtype == np.float32 and got.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_nhwc_rgb_single_mean_std_and_float16(tmp_path):
    pixels = _pixels(5, 7, seed=1)
    _png(tmp_path / "a.png", pixels)
    spec = ImageSpec(size=(5, 7), layout="NHWC", channels="RGB", scale=2.0, mean=[10.0], std=[4.0],
                     dtype="float16")
    got = _one_sample(tmp_path, spec, (None, 5, 7, 3), np.float16)
    want = ((pixels.astype(np.float64) / 2.0 - 10.0) / 4.0)[np.newaxis]
    assert got.dtype == np.float16 and got.shape == (1, 5, 7, 3)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-3, atol=1e-3)


def test_uint8_keeps_pixels(tmp_path):
    pixels = _pixels(4, 4, seed=2)
    _png(tmp_path / "a.png", pixels)
    spec = ImageSpec(size=(4, 4), channels="BGR", scale=1, mean=[0], std=[1], dtype="uint8")
    got = DataFolder(tmp_path, [InputSpec("x", np.dtype(np.uint8), (None, 3, 4, 4))], images=spec)
    (_, feeds), = list(got.samples())
    np.testing.assert_array_equal(feeds["x"][0], pixels[..., ::-1].transpose(2, 0, 1))


@pytest.mark.parametrize("height, width, short, want_hw", [
    (10, 30, 5, (5, 15)),   # landscape: height is the shorter side
    (30, 10, 5, (15, 5)),   # portrait
    (6, 10, 4, (4, 6)),     # int(4 * 10 / 6) = int(6.67) = 6: truncated, as torchvision does
])
def test_resize_shorter_side_keeps_aspect(tmp_path, height, width, short, want_hw):
    pixels = _pixels(height, width, seed=3)
    _png(tmp_path / "a.png", pixels)
    spec = ImageSpec(resize=short, crop="none", layout="NHWC", scale=1)
    got = _one_sample(tmp_path, spec, (None, None, None, 3))
    want = np.asarray(Image.fromarray(pixels).resize((want_hw[1], want_hw[0]), Image.Resampling.BILINEAR))
    assert got.shape == (1, *want_hw, 3)
    np.testing.assert_array_equal(got[0], want.astype(np.float32))


def test_resize_then_center_crop(tmp_path):
    pixels = _pixels(12, 20, seed=4)
    _png(tmp_path / "a.png", pixels)
    spec = ImageSpec(size=(4, 6), resize=6, layout="NHWC", scale=1)
    got = _one_sample(tmp_path, spec, (None, 4, 6, 3))
    resized = np.asarray(Image.fromarray(pixels).resize((10, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got[0], resized[1:5, 2:8].astype(np.float32))


def test_default_resize_is_exact_to_size_and_size_defaults_to_the_model(tmp_path):
    pixels = _pixels(9, 13, seed=5)
    _png(tmp_path / "a.png", pixels)
    want = np.asarray(Image.fromarray(pixels).resize((5, 3), Image.Resampling.BILINEAR))
    explicit = _one_sample(tmp_path, ImageSpec(size=(3, 5), layout="NHWC", scale=1), (None, None, None, 3))
    from_model = _one_sample(tmp_path, ImageSpec(scale=1), (1, 3, 3, 5))
    np.testing.assert_array_equal(explicit[0], want.astype(np.float32))
    np.testing.assert_array_equal(from_model[0], want.transpose(2, 0, 1).astype(np.float32))


def test_no_size_and_a_dynamic_model_is_named(tmp_path):
    _png(tmp_path / "a.png", _pixels(4, 4))
    with pytest.raises(DataError, match=r"a\.png: data\.images\.size is needed"):
        _one_sample(tmp_path, ImageSpec(), (None, 3, None, None))


def test_greyscale_and_palette_images_become_three_channels(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "a.png")
    got = _one_sample(tmp_path, ImageSpec(size=(3, 4), scale=1), (None, 3, 3, 4))
    np.testing.assert_array_equal(got[0], np.stack([grey] * 3).astype(np.float32))


# --- order, limit, batches --------------------------------------------------------------------

def test_files_are_read_in_sorted_order_and_limit_applies(tmp_path):
    for index, name in enumerate(["b.png", "a.jpg", "c.bmp", "10.PNG"]):
        _png(tmp_path / name, np.full((2, 2, 3), 10 * index, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not data")
    spec = ImageSpec(size=(2, 2), scale=1)
    inputs = [InputSpec("x", F32, (None, 3, 2, 2))]
    names = [name for name, _ in DataFolder(tmp_path, inputs, images=spec).samples()]
    assert names == ["10.PNG", "a.jpg", "b.png", "c.bmp"]
    limited = DataFolder(tmp_path, inputs, 2, images=spec)
    assert [name for name, _ in limited.samples()] == ["10.PNG", "a.jpg"]
    batches = list(DataFolder(tmp_path, inputs, 3, images=spec).batches(2))
    assert [batch.files for batch in batches] == [("10.PNG", "a.jpg"), ("b.png",)]
    assert batches[0].feeds["x"].shape == (2, 3, 2, 2)
    assert float(batches[0].feeds["x"][0, 0, 0, 0]) == 30.0  # 10.PNG was written fourth


# --- malformed and hostile files --------------------------------------------------------------

def test_truncated_png_names_the_file(tmp_path):
    path = _png(tmp_path / "cut.png", _pixels(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.png: not a readable image") as info:
        _one_sample(tmp_path, ImageSpec(size=(64, 64)), (None, 3, 64, 64))
    assert "\n" not in str(info.value)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(_pixels(64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: not a readable image"):
        _one_sample(tmp_path, ImageSpec(size=(64, 64)), (None, 3, 64, 64))


def test_garbage_and_other_formats_are_refused(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.png: not a readable image"):
        _one_sample(tmp_path, ImageSpec(size=(4, 4)), (None, 3, 4, 4))
    (tmp_path / "junk.png").unlink()
    Image.fromarray(_pixels(4, 4)).save(tmp_path / "gif.png", format="GIF")  # only PNG/JPEG/BMP decoders
    with pytest.raises(DataError, match=r"gif\.png: not a readable image"):
        _one_sample(tmp_path, ImageSpec(size=(4, 4)), (None, 3, 4, 4))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_png_claiming_huge_dimensions_is_a_decompression_bomb(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels, default limit kept
    with pytest.raises(DataError, match=r"bomb\.png: .*DecompressionBombError"):
        _one_sample(tmp_path, ImageSpec(size=(4, 4)), (None, 3, 4, 4))


@pytest.mark.parametrize("limit, kind", [(100, "DecompressionBombError"), (200, "DecompressionBombWarning")])
def test_decompression_bomb_limit_and_warning_are_errors(tmp_path, monkeypatch, limit, kind):
    _png(tmp_path / "big.png", _pixels(16, 16))  # 256 pixels: > 2x100 is an error, > 200 a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=rf"big\.png: not a readable image \({kind}"):
        _one_sample(tmp_path, ImageSpec(size=(16, 16)), (None, 3, 16, 16))


def test_npy_object_array_is_refused(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    data = DataFolder(tmp_path, [InputSpec("x", F32, (None, 2))])
    with pytest.raises(DataError, match=r"evil\.npy: holds Python objects \(dtype object\), which qtool never loads"):
        list(data.samples())


def test_image_that_does_not_fit_the_model_is_named(tmp_path):
    _png(tmp_path / "small.png", _pixels(4, 4))
    with pytest.raises(DataError, match=r"small\.png: array of shape \[1, 3, 4, 4\] does not fit input x"):
        _one_sample(tmp_path, ImageSpec(size=(4, 4)), (None, 3, 8, 8))
    with pytest.raises(DataError, match=r"small\.png: dtype uint8 does not fit input x"):
        _one_sample(tmp_path, ImageSpec(size=(4, 4), scale=1, mean=[0], std=[1], dtype="uint8"),
                    (None, 3, 4, 4))


def test_npy_of_the_wrong_shape_is_named(tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(DataError, match=r"wrong\.npy: array of shape \[1, 3, 5\] does not fit input x"):
        list(DataFolder(tmp_path, [InputSpec("x", F32, (None, 3, 4))]).samples())


def test_center_crop_larger_than_the_image_is_named(tmp_path):
    _png(tmp_path / "tiny.png", _pixels(4, 8))
    with pytest.raises(DataError, match=r"tiny\.png: resized to 4x8, smaller than data\.images\.size 6x6"):
        _one_sample(tmp_path, ImageSpec(size=(6, 6), resize=4), (None, 3, 6, 6))


def test_folder_rules(tmp_path):
    inputs = [InputSpec("x", F32, (None, 3, 2, 2))]
    _png(tmp_path / "a.png", _pixels(2, 2))
    with pytest.raises(DataError, match="needs a data.images section"):
        DataFolder(tmp_path, inputs)
    two_inputs = inputs + [InputSpec("y", F32, (None, 1))]
    with pytest.raises(DataError, match="single-input model; this model has inputs x, y"):
        DataFolder(tmp_path, two_inputs, images=ImageSpec(size=(2, 2)))
    np.save(tmp_path / "b.npy", np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(DataError, match=r"mixes image files and array files \(b\.npy\)"):
        DataFolder(tmp_path, inputs, images=ImageSpec(size=(2, 2)))
    (tmp_path / "a.png").unlink()
    arrays = DataFolder(tmp_path, inputs, images=ImageSpec(size=(2, 2)))  # spec unused for arrays
    assert [name for name, _ in arrays.samples()] == ["b.npy"]


# --- class sub-folders ------------------------------------------------------------------------

def test_integer_class_folders_label_their_samples(tmp_path):
    for label, name in [("1", "x.png"), ("0", "y.png"), ("0", "a.png"), ("7", "x.png")]:
        (tmp_path / label).mkdir(exist_ok=True)
        _png(tmp_path / label / name, _pixels(2, 2))
    (tmp_path / ".cache").mkdir()
    _png(tmp_path / ".cache" / "z.png", _pixels(2, 2))
    (tmp_path / "empty").mkdir()
    data = DataFolder(tmp_path, [InputSpec("x", F32, (None, 3, 2, 2))], images=ImageSpec(size=(2, 2)))
    assert [name for name, _ in data.samples()] == ["0/a.png", "0/y.png", "1/x.png", "7/x.png"]
    assert data.class_labels == {"0/a.png": 0, "0/y.png": 0, "1/x.png": 1, "7/x.png": 7}


def test_named_class_folders_are_labelled_by_sorted_index(tmp_path):
    for label in ["dog", "cat", "3"]:
        (tmp_path / label).mkdir()
        np.save(tmp_path / label / "s.npy", np.zeros((1, 2), np.float32))
    data = DataFolder(tmp_path, [InputSpec("x", F32, (None, 2))])
    assert data.class_labels == {"3/s.npy": 0, "cat/s.npy": 1, "dog/s.npy": 2}
    assert [batch.files for batch in data.batches(8)] == [("3/s.npy", "cat/s.npy", "dog/s.npy")]


def test_flat_folder_has_no_class_labels_and_labels_txt_still_reads(tmp_path):
    _png(tmp_path / "a.png", _pixels(2, 2))
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "b.png", _pixels(2, 2))
    (tmp_path / "labels.txt").write_text("a.png 3\n# comment\n\n")
    data = DataFolder(tmp_path, [InputSpec("x", F32, (None, 3, 2, 2))], images=ImageSpec(size=(2, 2)))
    assert data.class_labels is None
    assert [name for name, _ in data.samples()] == ["a.png"]
    assert read_labels(tmp_path / "labels.txt") == {"a.png": 3}


# --- the recipe's data section ----------------------------------------------------------------

def test_recipe_errors_name_line_and_key_for_image_keys(tmp_path):
    path = tmp_path / "r.yaml"
    head = "version: 1\ndata:\n  images:\n    size: [48, 192]\n"
    cases = {
        "    bogus: 1\n": r"r\.yaml:5: data\.images\.bogus: unknown key; allowed here: channels, crop, "
                         r"dtype, layout, mean, resize, scale, size, std",
        "    layout: CHW\n": r"r\.yaml:5: data\.images\.layout: 'CHW' is not allowed: .*'NCHW' or 'NHWC'",
        "    mean: [1, 2]\n": r"r\.yaml:5: data\.images\.mean: .*expected 1 or 3 values",
        "    resize: [0, 3]\n": r"r\.yaml:5: data\.images\.resize: .*\[H, W\] or null",
        "    dtype: uint8\n": r"r\.yaml:5: data\.images\.dtype: .*set scale: 1",
        "    std: [0.5, 0, 1]\n": r"r\.yaml:5: data\.images\.std\.1: 0 is not allowed",
    }
    for line, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            parse_recipe(head + line, path)
    with pytest.raises(RecipeError, match=r"r\.yaml:3: data\.extra: unknown key; allowed here: audio, images, state, text"):
        parse_recipe("version: 1\ndata:\n  extra: 1\n", path)
    with pytest.raises(RecipeError, match=r"r\.yaml:4: data\.images\.size: \[48\] is not allowed"):
        parse_recipe("version: 1\ndata:\n  images:\n    size: [48]\n", path)


def test_recipe_without_data_section_has_no_image_spec(tmp_path):
    recipe = parse_recipe("version: 1\n", tmp_path / "r.yaml")
    assert recipe.data.images is None
    assert recipe.as_dict()["data"] == {"images": None, "text": None, "audio": None, "state": None}


# --- the shared PaddleOCR models --------------------------------------------------------------

needs_shared = pytest.mark.skipif(not (SHARED_MODELS / "MANIFEST.md").is_file(),
                                  reason="shared/models is not beside the repository")


def _model_input(session: ort.InferenceSession) -> InputSpec:
    (value,) = session.get_inputs()
    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
    return InputSpec(value.name, F32, shape)


@needs_shared
def test_ppocr_cls_float_accuracy_through_the_config():
    folder = SHARED_MODELS / "ppocr_cls"
    recipe = load_recipe(REPO / "qtool" / "recipe" / "presets" / "ppocr_cls.yaml")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    data = DataFolder(folder / "eval", [_model_input(session)], images=recipe.data.images)
    labels = read_labels(folder / "eval" / "labels.txt")
    correct = total = 0
    for batch in data.batches(recipe.calibration.batch_size):
        assert batch.feeds["x"].shape[1:] == (3, 48, 192)
        (scores,) = session.run(None, batch.feeds)
        truth = np.array([labels[name] for name in batch.files])
        correct += int(np.sum(scores.argmax(axis=1) == truth))
        total += len(batch.files)
    assert (correct, total) == (89, 96)


@needs_shared
def test_ppocr_det_config_gives_320_by_320_bgr_inputs():
    folder = SHARED_MODELS / "ppocr_det"
    recipe = load_recipe(REPO / "qtool" / "recipe" / "presets" / "ppocr_det.yaml")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    data = DataFolder(folder / "calib", [_model_input(session)], images=recipe.data.images)
    name, feeds = next(data.samples())
    assert name == "0000.jpg" and feeds["x"].shape == (1, 3, 320, 320)
    rgb = np.asarray(Image.open(folder / "calib" / name).convert("RGB").resize((320, 320), Image.Resampling.BILINEAR))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = ((rgb[..., ::-1] / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(feeds["x"][0], want, atol=1e-5)
    (prob,) = session.run(None, feeds)
    assert prob.shape[-2:] == (320, 320) and 0.0 <= prob.min() and prob.max() <= 1.0
