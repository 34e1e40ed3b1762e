"""Models with subgraphs (If): the bodies stay float, and quantization outside never corrupts what flows in."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import save_npy_folder, fused_recipe
from qtool import api
from qtool.runtime.session import make_session, run

RNG = np.random.default_rng(11)


def branch(name: str, conv_weight: str, matmul_weight: str) -> onnx.GraphProto:
    """Conv → Relu → Flatten → MatMul over the outer tensor `r` and outer initializers."""
    return helper.make_graph(
        [helper.make_node("Conv", ["r", conv_weight], [f"{name}_c"], name=f"{name}/conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}/relu"),
         helper.make_node("Flatten", [f"{name}_r"], [f"{name}_f"], name=f"{name}/flatten"),
         helper.make_node("MatMul", [f"{name}_f", matmul_weight], [f"{name}_out"], name=f"{name}/matmul")],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 5])],
    )


def if_model() -> onnx.ModelProto:
    inits = {
        "w0": RNG.normal(size=(4, 3, 3, 3)), "w1": RNG.normal(size=(4, 4, 3, 3)) / 6,
        "w2": RNG.normal(size=(4, 4, 3, 3)) / 6, "wm": RNG.normal(size=(256, 5)) / 16,
        "wg": RNG.normal(size=(4, 5)), "zero": np.zeros(()),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["x"], ["m"], name="mean", keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["branch_out"], name="if",
                         then_branch=branch("then", "w1", "wm"), else_branch=branch("else", "w2", "wm")),
        # r is also read outside the If, so it does get a Q/DQ pair there.
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["gf"], name="gap_flatten"),
        helper.make_node("MatMul", ["gf", "wg"], ["y2"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_if_branches_stay_float_and_outputs_stay_close(tmp_path):
    path = tmp_path / "model.onnx"
    float_model = if_model()
    onnx.save_model(float_model, str(path))
    samples = [RNG.normal(loc=shift, size=(1, 3, 8, 8)) for shift in [-0.5, 0.5] * 8]  # both branches taken
    data = save_npy_folder(tmp_path / "data", samples)
    result = api.quantize(path, data, fused_recipe())
    model = result.model
    onnx.checker.check_model(model, full_check=True)

    decisions = {n["node"]: n for n in result.report["plan"]["nodes"]}
    assert decisions["if"]["reason"] == "has a subgraph (its bodies stay float)"
    assert decisions["conv"]["quantized"] and decisions["head"]["quantized"]
    note = next(n for n in result.report["plan"]["notes"] if n.startswith("if (If): subgraph left float"))
    assert "r" in note and "w1" in note
    # The bodies are untouched and read the outer float `r`, which the Conv/Relu still write.
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then_branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv", "Relu", "Flatten", "MatMul"]
    assert then_branch.node[0].input[0] == "r"
    assert any(n.op_type == "Relu" and n.output[0] == "r" for n in model.graph.node)
    # Outer initializers the bodies read are still there, as float.
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["w1"] == inits["w2"] == inits["wm"] == TensorProto.FLOAT
    # Outside, the Conv is quantized; r reaches the GlobalAveragePool through Q/DQ.
    assert "r" in {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}

    float_session, quant_session = make_session(float_model), make_session(model)
    for sample in samples[:4]:
        feed = {"x": sample.astype(np.float32)}
        want, got = run(float_session, feed), run(quant_session, feed)
        for name in ("branch_out", "y2"):
            a, b = want[name].ravel(), got[name].ravel()
            cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            assert cosine >= 0.99, (name, cosine)
    outputs = result.report["validation"]["outputs"]
    assert min(o["cosine"] for o in outputs.values()) >= 0.99
