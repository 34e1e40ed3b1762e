"""Every preset (qtool/recipe/presets/) on the sample CNN and on a small transformer encoder built here.

Each must give a model that passes onnx.checker (full check) and runs in ONNX
Runtime (w4-matmul finds nothing to quantize in the sample CNN: refused); w4-matmul
must shrink MatMul weights at least 6x at cosine >= 0.99.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLE, save_npy_folder
from qtool import api
from qtool.errors import ModelError
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe
from qtool.runtime.session import make_session, run

CONFIGS = sorted((ROOT / "qtool" / "recipe" / "presets").glob("*.yaml"))
HIDDEN, FFN, SEQ = 256, 1024, 16


def encoder_model(layers: int = 2, hidden: int = HIDDEN, ffn: int = FFN, seed: int = 0) -> onnx.ModelProto:
    """A MatMul-heavy post-LN transformer encoder: single-head attention, GELU-ish FFN (x * sigmoid(1.702x))."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}

    def weight(name, shape):
        inits[name] = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
        return name

    def bias(name, size):
        inits[name] = (0.02 * rng.normal(size=size)).astype(np.float32)
        return name

    def op(op_type, inputs, output, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [output], name=f"/{output}", **attrs))
        return output

    inits["scale"] = np.array(1 / np.sqrt(hidden), np.float32)
    inits["gelu_k"] = np.array(1.702, np.float32)
    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        q = op("Add", [op("MatMul", [x, weight(f"{p}.wq", (hidden, hidden))], f"{p}/q_mm"), bias(f"{p}.bq", hidden)], f"{p}/q")
        k = op("Add", [op("MatMul", [x, weight(f"{p}.wk", (hidden, hidden))], f"{p}/k_mm"), bias(f"{p}.bk", hidden)], f"{p}/k")
        v = op("Add", [op("MatMul", [x, weight(f"{p}.wv", (hidden, hidden))], f"{p}/v_mm"), bias(f"{p}.bv", hidden)], f"{p}/v")
        kt = op("Transpose", [k], f"{p}/kt", perm=[0, 2, 1])
        scores = op("Mul", [op("MatMul", [q, kt], f"{p}/qk"), "scale"], f"{p}/scores")
        attn = op("MatMul", [op("Softmax", [scores], f"{p}/probs", axis=-1), v], f"{p}/ctx")
        out = op("Add", [op("MatMul", [attn, weight(f"{p}.wo", (hidden, hidden))], f"{p}/o_mm"), bias(f"{p}.bo", hidden)], f"{p}/o")
        inits[f"{p}.ln1_g"], inits[f"{p}.ln1_b"] = np.ones(hidden, np.float32), np.zeros(hidden, np.float32)
        h = op("LayerNormalization", [op("Add", [x, out], f"{p}/res1"), f"{p}.ln1_g", f"{p}.ln1_b"], f"{p}/ln1", axis=-1)
        up = op("Add", [op("MatMul", [h, weight(f"{p}.w1", (hidden, ffn))], f"{p}/up_mm"), bias(f"{p}.b1", ffn)], f"{p}/up")
        gate = op("Sigmoid", [op("Mul", [up, "gelu_k"], f"{p}/up_k")], f"{p}/gate")
        act = op("Mul", [up, gate], f"{p}/gelu")
        down = op("Add", [op("MatMul", [act, weight(f"{p}.w2", (ffn, hidden))], f"{p}/down_mm"), bias(f"{p}.b2", hidden)], f"{p}/down")
        inits[f"{p}.ln2_g"], inits[f"{p}.ln2_b"] = np.ones(hidden, np.float32), np.zeros(hidden, np.float32)
        x = op("LayerNormalization", [op("Add", [h, down], f"{p}/res2"), f"{p}.ln2_g", f"{p}.ln2_b"], f"{p}/ln2", axis=-1)
    nodes.append(helper.make_node("Identity", [x], ["y"], name="/output"))
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, hidden])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("encoder")
    path = root / "model.onnx"
    onnx.save_model(encoder_model(), str(path))
    rng = np.random.default_rng(1)
    data = save_npy_folder(root / "data", rng.normal(size=(16, 1, SEQ, HIDDEN)))
    return path, data


def quick(recipe: Recipe, samples: int) -> Recipe:
    """The recipe with fewer calibration and validation samples, to keep the suite fast."""
    return recipe.model_copy(update={
        "calibration": recipe.calibration.model_copy(update={"samples": samples}),
        "validation": recipe.validation.model_copy(update={"samples": samples}),
    })


def check_runs(result: api.QuantizeResult, data: Path) -> None:
    onnx.checker.check_model(result.model, full_check=True)
    feed = np.load(sorted(data.glob("*.npy"))[0])
    name = result.model.graph.input[0].name
    outputs = run(make_session(result.model), {name: feed})
    assert all(np.all(np.isfinite(value)) for value in outputs.values())


def matmul_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers that MatMul/MatMulNBits weights are made from (codes, scales, zero points)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            total += sum(len(inits[name].raw_data) for name in node.input[1:] if name)
        elif node.op_type == "MatMul" and node.input[1] in inits:
            total += len(inits[node.input[1]].raw_data)
        elif node.op_type == "MatMul" and node.input[1] in producers \
                and producers[node.input[1]].op_type == "DequantizeLinear":
            total += sum(len(inits[name].raw_data) for name in producers[node.input[1]].input if name in inits)
    return total


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_on_sample_model(config):
    if config.stem == "w4-matmul":  # the sample CNN has no MatMul: a run that quantizes nothing is refused
        with pytest.raises(ModelError, match="nothing to quantize: none of its 13 nodes .*Gemm×2.*quantization.static is false"):
            api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", quick(load_recipe(config), 16))
        return
    result = api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", quick(load_recipe(config), 16))
    check_runs(result, SAMPLE / "calib")
    assert result.report["validation"]["outputs"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_on_encoder(config, encoder):
    path, data = encoder
    result = api.quantize(path, data, quick(load_recipe(config), 8))
    check_runs(result, data)
    cosine = next(iter(result.report["validation"]["outputs"].values()))["cosine"]
    assert cosine >= 0.95, cosine
    if config.stem == "a16w8":
        # ORT fuses each DequantizeLinear -> MatMul into MatMulNBits, which computes with 8-bit
        # activations by default (~8 dB lost here): the report names the session option that avoids it.
        assert result.report["kernels"]["integer_ops"].get("MatMulNBits") == 12
        assert any("session.qdq_matmulnbits_accuracy_level=1" in w for w in result.report["warnings"])


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_w4_matmul_encoder_is_six_times_smaller_and_close(fmt, encoder):
    path, data = encoder
    recipe = load_recipe(ROOT / "qtool" / "recipe" / "presets" / "w4-matmul.yaml")
    spec = recipe.quantization.weight_only.model_copy(update={"format": fmt})
    recipe = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={"weight_only": spec})})
    result = api.quantize(path, data, quick(recipe, 8))
    check_runs(result, data)
    float_model = onnx.load(str(path))
    ratio = matmul_weight_bytes(float_model) / matmul_weight_bytes(result.model)
    ops = result.report["kernels"]["optimized_ops"]
    cosine = result.report["validation"]["outputs"]["y"]["cosine"]
    print(f"w4-matmul {fmt}: MatMul weight bytes {ratio:.2f}x smaller, cosine {cosine:.5f}, "
          f"MatMulNBits after ORT optimization: {ops.get('MatMulNBits', 0)}")
    assert ratio >= 6.0
    assert cosine >= 0.99
    assert ops.get("MatMulNBits", 0) == 12  # ORT fuses blocked int4 DQ -> MatMul into the same kernel
    if fmt == "matmulnbits":
        assert result.report["plan"]["weight_only_matmulnbits"] == 12
    else:
        assert result.model.opset_import[0].version == 21
