"""Property-based fuzzing: recipes, mutated ONNX files and mutated .npz files.

Whatever the input, `qtool.quantize` either succeeds or raises a QtoolError
(exit code 2) — never another exception, never a hang — and a failed run
leaves no artifact. `make test` runs a small, reproducible budget;
`make fuzz` (QTOOL_FUZZ_EXAMPLES=3500) runs each test long with fresh random cases.
"""

from __future__ import annotations

import io
import os
import tempfile
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from pydantic import BaseModel

from conftest import make_model, save_npy_folder
from qtool import api
from qtool.errors import EXIT_BAD_INPUT, QtoolError
from qtool.recipe.schema import Recipe

FUZZ_EXAMPLES = int(os.environ.get("QTOOL_FUZZ_EXAMPLES", "0"))
settings.register_profile(
    "qtool-ci", max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "qtool-fuzz", max_examples=FUZZ_EXAMPLES or 3500, deadline=30_000, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("qtool-fuzz" if FUZZ_EXAMPLES else "qtool-ci")


def tiny_model() -> onnx.ModelProto:
    """Conv → BatchNormalization → Relu → Flatten → MatMul → Add: every stage has work to do."""
    rng = np.random.RandomState(0)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_add"),
    ]
    weights = {
        "conv_w": rng.randn(4, 1, 3, 3).astype(np.float32), "conv_b": rng.randn(4).astype(np.float32),
        "bn_s": rng.rand(4).astype(np.float32) + 0.5, "bn_b": rng.randn(4).astype(np.float32),
        "bn_m": rng.randn(4).astype(np.float32), "bn_v": rng.rand(4).astype(np.float32) + 0.5,
        "fc_w": rng.randn(64, 8).astype(np.float32) / 8, "fc_b": rng.randn(8).astype(np.float32),
    }
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], weights)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    onnx.save(tiny_model(), str(folder / "model.onnx"))
    rng = np.random.RandomState(1)
    save_npy_folder(folder / "data", [rng.randn(1, 1, 4, 4) for _ in range(6)])
    sample = io.BytesIO()
    np.savez(sample, x=rng.randn(1, 1, 4, 4).astype(np.float32))
    return {"model": (folder / "model.onnx").read_bytes(), "data": folder / "data", "npz": sample.getvalue()}


def run_quantize(model: Path, data: Path, recipe=None) -> None:
    """Run one quantize into a fresh output; allow success or a QtoolError with nothing left behind."""
    output = model.parent / "out"
    try:
        api.quantize(model, data, recipe, output)
    except QtoolError as exc:
        event(f"refused: {type(exc).__name__}")
        assert exc.exit_code == EXIT_BAD_INPUT
        assert str(exc).strip(), "a QtoolError needs a message"
        assert not output.exists(), "a failed run left an output folder"
    else:
        event("quantized")
        assert (output / "model.onnx").is_file()
    assert not list(model.parent.glob("*.qtool-tmp")), "temporary folder left behind"


# --- recipes --------------------------------------------------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _literals(annotation) -> set:
    values = set()
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        values |= _literals(arg)
    return values


def _plausible(annotation) -> list[st.SearchStrategy]:
    """Values of roughly the right type for a field, so that many recipes get past validation."""
    options = []
    literals = sorted(_literals(annotation), key=repr)
    if literals:
        options.append(st.sampled_from(literals))
    names = {getattr(arg, "__name__", "") for arg in (annotation, *typing.get_args(annotation))}
    text = repr(annotation)
    if "int" in names or "int" in text:
        options.append(st.integers(1, 70))
    if "float" in names or "float" in text:
        options.append(st.floats(0.0, 100.0))
    if "dict" in text:
        options.append(st.dictionaries(st.sampled_from(["min_cosine", "min_sqnr_db", "min_top1_agreement"]),
                                       st.floats(0.0, 1.0), max_size=2))
    if "list[str]" in text or "str" in names:
        options.append(st.lists(st.sampled_from(["conv", "fc.*", "Conv", "MatMul", ".*", "(", "Relu"]), max_size=2))
        options.append(st.sampled_from(["conv", "fc.*", "Conv", "MatMul", "x", "[", "data"]))
    return options


def schema_tree(model: type[BaseModel]) -> dict:
    """{key: (sub-tree or None, is_list, plausible value strategies)} for every field of the schema."""
    tree = {}
    for name, field in model.model_fields.items():
        if name == "source":
            continue
        nested = _models_in(field.annotation)
        is_list = typing.get_origin(field.annotation) is list or any(
            typing.get_origin(arg) is list for arg in typing.get_args(field.annotation))
        tree[name] = (schema_tree(nested[0]) if nested else None, is_list, _plausible(field.annotation))
    return tree


TREE = schema_tree(Recipe)


def _all_literals(model: type[BaseModel]) -> set:
    values = set()
    for field in model.model_fields.values():
        values |= {v for v in _literals(field.annotation) if isinstance(v, (str, int, float, bool))}
        for nested in _models_in(field.annotation):
            values |= _all_literals(nested)
    return values


LITERALS = sorted(_all_literals(Recipe), key=repr)
KEYS = sorted({key for key in TREE} | {"min_cosine", "min_sqnr_db", "max_accuracy_drop", "max_latency_ratio"}
              | {k for sub, _, _ in TREE.values() if sub for k in sub})
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.integers(0, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.sampled_from(LITERALS),
    st.text(max_size=12), st.sampled_from([".", "..", "/", "data", ".*", "(", "[a-", "*", "conv", "fc"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                                            max_size=4)),
    max_leaves=12,
)


def section(tree: dict, wild: bool = True) -> st.SearchStrategy:
    """A mapping of schema keys, each with a plausible value; `wild` adds random keys and values."""
    def value_for(key: str) -> st.SearchStrategy:
        sub, is_list, plausible = tree[key]
        wild_values = [VALUES] if wild or not plausible and sub is None else []
        options = [*wild_values, *plausible, *plausible]
        if sub is not None:
            child = st.deferred(lambda: section(sub, wild))
            options = [*wild_values, child, child] + ([st.lists(child, max_size=2)] * 2 if is_list else [])
        return st.one_of(*options)

    known = st.sampled_from(sorted(tree)).flatmap(lambda key: st.tuples(st.just(key), value_for(key)))
    stray = st.tuples(st.sampled_from(KEYS), VALUES)
    return st.lists(st.one_of(known, known, known, known, known, stray) if wild else known, max_size=4).map(dict)


RECIPE_TEXT = st.one_of(
    section(TREE, wild=False).map(lambda doc: yaml.safe_dump(doc, sort_keys=False)),
    section(TREE, wild=False).map(lambda doc: yaml.safe_dump(doc, sort_keys=False)),
    section(TREE).map(lambda doc: yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)),
    section(TREE).map(lambda doc: yaml.safe_dump(doc, default_flow_style=True)),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["version: 1\n", "!!python/object/apply:os.system ['true']\n", "? [a, b]\n: 1\n",
                     "calibration: &a [*a]\n", "[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "1" + "}" * 3000,
                     "a: &x 1\nb: *x\n", "version: 1\n...\n---\nversion: 1\n"]),
)


@PROFILE
@given(text=RECIPE_TEXT)
def test_fuzz_recipes(assets, text):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "model.onnx").write_bytes(assets["model"])
        recipe = folder / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
        run_quantize(folder / "model.onnx", assets["data"], recipe)


# --- mutated ONNX files ---------------------------------------------------------------------


def mutate(data: bytes, draw) -> bytes:
    """Bit flips, byte overwrites, truncation, insertion or deletion at random places."""
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "byte", "truncate", "insert", "delete", "splice"]))
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        if kind == "flip":
            buffer[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            buffer[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buffer[at:at + draw(st.integers(1, 8))]
        else:  # copy one run of bytes over another: valid-looking protobuf fields in odd places
            length = draw(st.integers(1, 32))
            source = draw(st.integers(0, len(buffer) - 1))
            buffer[at:at + length] = buffer[source:source + length]
    return bytes(buffer)


@PROFILE
@given(data=st.data())
def test_fuzz_onnx_files(assets, data):
    mutated = mutate(assets["model"], data.draw)
    assume(mutated != assets["model"])
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "model.onnx").write_bytes(mutated)
        run_quantize(folder / "model.onnx", assets["data"])


# --- mutated and odd .npz files -------------------------------------------------------------

DTYPES = ["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "U3", "S2", "V4",
          "datetime64[s]", "M8[ns]"]


@st.composite
def npz_bytes(draw, template: bytes) -> bytes:
    if draw(st.booleans()):
        return mutate(template, draw)
    arrays = {}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.just("x"), st.just("y"), st.text(min_size=1, max_size=4)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=5)))
        arrays[key] = np.zeros(shape, dtype)
    buffer = io.BytesIO()
    try:
        np.savez(buffer, **arrays)
    except (ValueError, TypeError):
        return template
    return buffer.getvalue()


@PROFILE
@given(data=st.data())
def test_fuzz_npz_files(assets, data):
    files = data.draw(st.lists(npz_bytes(assets["npz"]), min_size=1, max_size=3))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "model.onnx").write_bytes(assets["model"])
        samples = folder / "data"
        samples.mkdir()
        for i, content in enumerate(files):
            (samples / f"{i:04d}.npz").write_bytes(content)
        run_quantize(folder / "model.onnx", samples)
