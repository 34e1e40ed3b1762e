"""Third-party models from ../shared/models: opset < 13, Constant-node weights, BN, HardSigmoid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_model
from qtool import api
from qtool.recipe import Recipe


def image_folder_to_npy(source, target, size, bgr, mean, std):
    """Preprocess as MANIFEST.md says, into .npy files the data reader takes."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.*")):
        if path.suffix not in (".png", ".jpg"):
            continue
        pixels = np.asarray(Image.open(path).convert("RGB").resize(size[::-1]), np.float32) / 255.0
        if bgr:
            pixels = pixels[:, :, ::-1]
        pixels = (pixels - np.array(mean, np.float32)) / np.array(std, np.float32)
        np.save(target / f"{path.stem}.npy", pixels.transpose(2, 0, 1)[None].astype(np.float32))
    labels = source / "labels.txt"
    if labels.exists():
        lines = [line.split() for line in labels.read_text().splitlines() if line.strip()]
        (target / "labels.txt").write_text("".join(f"{name.rsplit('.', 1)[0]}.npy {label}\n"
                                                   for name, label in lines))
    return target


@pytest.fixture(scope="module")
def ppocr_cls(tmp_path_factory):
    folder = shared_model("ppocr_cls")
    root = tmp_path_factory.mktemp("ppocr_cls")
    args = dict(size=(48, 192), bgr=False, mean=[0.5] * 3, std=[0.5] * 3)
    calib = image_folder_to_npy(folder / "calib", root / "calib", **args)
    evaluation = image_folder_to_npy(folder / "eval", root / "eval", **args)
    return api.quantize(folder / "model.onnx", calib, Recipe(), validation_data=evaluation)


@pytest.fixture(scope="module")
def ppocr_det(tmp_path_factory):
    folder = shared_model("ppocr_det")
    root = tmp_path_factory.mktemp("ppocr_det")
    args = dict(size=(320, 320), bgr=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    calib = image_folder_to_npy(folder / "calib", root / "calib", **args)
    evaluation = image_folder_to_npy(folder / "eval", root / "eval", **args)
    return api.quantize(folder / "model.onnx", calib, Recipe(), validation_data=evaluation)


def test_ppocr_cls_per_channel_integer_kernels_and_accuracy(ppocr_cls):
    report = ppocr_cls.report
    assert any("opset upgraded from 11 to 13" in note for note in report["prepare"])
    assert any("Constant nodes turned into initializers" in note for note in report["prepare"])
    assert report["plan"]["weights"] >= 50  # every Conv weight stored as int8
    axes = {node.attribute[0].i for node in ppocr_cls.model.graph.node
            if node.op_type == "DequantizeLinear" and node.attribute}
    assert 0 in axes  # per-channel
    assert report["kernels"]["integer_ops"]["QLinearConv"] >= 50
    accuracy = report["validation"]["accuracy"]
    assert accuracy["float"] == pytest.approx(89 / 96)
    assert accuracy["drop"] <= 0.02, accuracy


def test_ppocr_det_loads_and_runs_with_integer_kernels(ppocr_det):
    report = ppocr_det.report
    assert any("opset upgraded from 12 to 13" in note for note in report["prepare"])
    assert report["kernels"]["integer_ops"]["QLinearConv"] >= 50
    output = next(iter(report["validation"]["outputs"].values()))
    assert output["cosine"] > 0.8
    assert report["size"]["ratio"] > 2.5
