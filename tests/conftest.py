"""Shared paths and small model builders for the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn"
SHARED_MODELS = ROOT.parent / "shared" / "models"

# Tiny test models (8x8 images, 64-wide MatMuls) run faster as float than as int8 on ONNX Runtime's CPU,
# so the default `placement: fast` keeps them float (or refuses them: no 8-bit kernel pays). Tests about
# what an 8-bit plan does on such a model pin `placement: fused`: quantize wherever ORT fuses an integer kernel.
FUSED = "version: 1\nquantization: {placement: fused}\n"


def fused(text: str) -> str:
    """Recipe YAML `text` with `quantization.placement: fused` added where it names no placement."""
    import yaml

    recipe = yaml.safe_load(text) or {}
    quantization = recipe.setdefault("quantization", {})
    if "placement" in quantization:
        return text
    quantization["placement"] = "fused"
    return yaml.safe_dump(recipe, sort_keys=False)


def fused_recipe(recipe=None):
    """`recipe` (default: the built-in default Recipe()) with `quantization.placement: fused`."""
    from qtool.recipe.schema import Recipe

    recipe = recipe or Recipe()
    return recipe.with_placement("fused")


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not (path / "model.onnx").is_file():
        pytest.skip(f"shared model {name} not found at {path}")
    return path


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    """A checked model from onnx.helper pieces; initializers given as {name: array}."""
    graph = helper.make_graph(
        nodes, "test", inputs, outputs,
        [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def untimed_recipe(folder: Path, preset: str = "int8", placement: str | None = "fused") -> Path:
    """A shipped recipe without its max_latency_ratio gate, with `placement` (None: the preset's own),
    written into `folder`.

    Tiny test models run faster in float than in int8 (per-op overhead dominates), and a timing gate
    on a shared machine is bench-latency's business: tests that check inputs, placement or accuracy
    with a shipped recipe use this copy, every other setting as shipped; `placement: fused`, since the
    default `fast` would keep a tiny model float.
    """
    import yaml

    recipe = yaml.safe_load((ROOT / "qtool" / "recipe" / "presets" / f"{preset}.yaml").read_text())
    recipe["validation"]["gates"].pop("max_latency_ratio", None)
    if placement:
        recipe.setdefault("quantization", {})["placement"] = placement
    path = folder / f"{preset}-untimed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def save_npy_folder(folder: Path, arrays) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        np.save(folder / f"{i:04d}.npy", np.asarray(array, dtype=np.float32))
    return folder


def quantize_tiny(tmp_path: Path, model: onnx.ModelProto, recipe_text: str = FUSED, samples: int = 16,
                  seed: int = 0):
    """Quantize `model` (input [N, 3, 8, 8]) with `recipe_text`, on `samples` seeded normal inputs; a recipe
    naming no placement gets `placement: fused` (see FUSED: the default `fast` keeps tiny models float)."""
    from qtool import api
    from qtool.recipe.load import load_recipe

    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(seed).normal(size=(samples, 1, 3, 8, 8)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(fused(recipe_text))
    return api.quantize(path, data, load_recipe(recipe))


def conv_gemm(rng: np.random.Generator) -> onnx.ModelProto:
    """x [N, 3, 8, 8] → /enc/conv (4 channels, weight w, bias b) → /enc/relu → /head/flatten → /head/fc
    (Gemm, weight fw [5, 256], bias fb) → y [N, 5]; weights drawn from `rng`."""
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="/enc/conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="/enc/relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="/head/flatten"),
         helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="/head/fc", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
         "fw": rng.normal(size=(5, 256)).astype(np.float32), "fb": rng.normal(size=5).astype(np.float32)},
    )


def matmul_chain(width: int = 8, layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x [N, width] → (MatMul → Relu) × layers, seeded weights."""
    rng = np.random.RandomState(seed)
    nodes, weights, previous = [], {}, "x"
    for i in range(layers):
        weights[f"w{i}"] = (rng.randn(width, width) / np.sqrt(width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                      [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", width])], weights)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """x [N, 16, 64] → MatMul → Add → Relu; 32 samples with heavy tails, as .npy files (calibration tests)."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["act"]),
         helper.make_node("Relu", ["act"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 64])],
        {"w": rng.normal(size=(64, 64)).astype(np.float32) / 8, "b": rng.normal(size=64).astype(np.float32)},
    )
    folder = save_npy_folder(tmp_path_factory.mktemp("tiny") / "data", rng.standard_t(3, size=(32, 16, 64)))
    return model, folder


def with_fused_recipe(args: list) -> list:
    """CLI `args` of a `quantize` or `tune` on a tiny model given no --recipe: with `--recipe` a file holding
    FUSED (the built-in default with `placement: fused`; see FUSED)."""
    if not args or str(args[0]) not in ("quantize", "tune") or "--recipe" in map(str, args):
        return list(args)
    import tempfile

    path = Path(tempfile.gettempdir()) / f"qtool-tests-fused-{os.getpid()}.yaml"
    if not path.is_file():
        path.write_text(FUSED)
    return [*args, "--recipe", str(path)]
