"""Third-party models from ../shared/models: opset < 13, Constant-node weights, BN, HardSigmoid.

They are quantized straight from their image folders with the presets in qtool/recipe/presets/.
"""

from __future__ import annotations

import pytest

from conftest import ROOT, shared_model
from qtool import api
from qtool.quantization.kernel_costs import SLOWER_PREFIX
from qtool.recipe.load import load_recipe


def fused_preset(name: str):
    """The shipped preset with `placement: fused`: these tests check integer kernels, which the ppocr_cls
    preset's `fast` placement leaves out on CPU (test_ppocr_cls_preset_writes_it_float)."""
    recipe = load_recipe(ROOT / "qtool" / "recipe" / "presets" / f"{name}.yaml")
    return recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"placement": "fused"})})


def quantize_shared(name: str):
    folder = shared_model(name)
    return api.quantize(folder / "model.onnx", folder / "calib", fused_preset(name), validation_data=folder / "eval")


@pytest.fixture(scope="module")
def ppocr_cls():
    return quantize_shared("ppocr_cls")


@pytest.fixture(scope="module")
def ppocr_det():
    return quantize_shared("ppocr_det")


def test_ppocr_cls_per_channel_integer_kernels_and_accuracy(ppocr_cls):
    report = ppocr_cls.report
    assert any("opset upgraded from 11 to 13" in note for note in report["prepare"])
    assert any("Constant nodes turned into initializers" in note for note in report["prepare"])
    assert report["plan"]["weights"] >= 50  # every Conv weight stored as int8
    axes = {attr.i for node in ppocr_cls.model.graph.node if node.op_type == "DequantizeLinear"
            for attr in node.attribute if attr.name == "axis"}
    assert 0 in axes  # per-channel
    assert report["kernels"]["integer_ops"]["QLinearConv"] >= 50
    accuracy = report["validation"]["accuracy"]
    assert accuracy["float"] == pytest.approx(89 / 96)
    assert accuracy["drop"] <= 0.02, accuracy
    # Every accuracy gate passes; max_latency_ratio depends on this machine and its load (bench-latency's job).
    assert all(gate.passed for gate in ppocr_cls.gates if gate.name != "max_latency_ratio")
    assert "latency" in report  # the recipe's latency gate has it measured


def test_ppocr_cls_preset_keeps_its_slower_integer_kernels_float():
    """ppocr_cls's int8 model ran at 0.6x float; its preset's `placement: fast` keeps float what ONNX Runtime's
    CPU integer kernels run slower (kernel_costs' table): the first conv, the depthwise convs, the uint8 MaxPool."""
    folder = shared_model("ppocr_cls")
    recipe = load_recipe(ROOT / "qtool" / "recipe" / "presets" / "ppocr_cls.yaml")
    recipe = recipe.model_copy(update={"validation": recipe.validation.model_copy(update={"gates": {}, "samples": 4}),
                                       "calibration": recipe.calibration.model_copy(update={"samples": 4})})
    result = api.quantize(folder / "model.onnx", folder / "calib", recipe, validation_data=folder / "eval")
    reasons = {node["node"]: node["reason"] for node in result.report["plan"]["nodes"]}
    for node in ("Conv@0", "Conv@43", "Conv@48", "MaxPool@0"):  # 3->8 first layer, 200-channel depthwise, pool
        assert reasons[node].startswith(SLOWER_PREFIX), (node, reasons[node])
    assert sum(reason.startswith(SLOWER_PREFIX) for reason in reasons.values()) >= 100


def test_ppocr_det_loads_and_runs_with_integer_kernels(ppocr_det):
    report = ppocr_det.report
    assert any("opset upgraded from 12 to 13" in note for note in report["prepare"])
    assert report["kernels"]["integer_ops"]["QLinearConv"] >= 50
    output = next(iter(report["validation"]["outputs"].values()))
    assert output["cosine"] > 0.85
    assert report["size"]["ratio"] > 2.5


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_det"])
def test_inspect_counts_the_nodes_quantize_quantizes(name, request):
    """inspect runs the placement pass quantize runs (on placeholder ranges): its counts per op type are
    quantize's. Before, it counted before placement: 173 against quantize's 164 on ppocr_cls."""
    quantized = request.getfixturevalue(name).report["plan"]
    inspected = api.inspect(shared_model(name) / "model.onnx", fused_preset(name)).as_dict()["quantization"]
    assert inspected["nodes_quantized"] == quantized["nodes_quantized"]
    assert inspected["quantized_op_types"] == quantized["quantized_by_op"]
