"""quantization.algorithms.keep_float: the candidate regions at a model's ends, the measured choice of
which to keep float (nodes asserted), its report, its bounds, deterministic."""

from __future__ import annotations

import jsonschema
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, save_npy_folder, fused_recipe
from qtool import api
from qtool.evaluation.float_choice import ACT_BELOW_DB
from qtool.quantization.algorithms.float_ends import MAC_BUDGET, candidate_regions, layer_macs, layers
from qtool.quantization.plan import select_tensors
from qtool.recipe.schema import Recipe

RNG = np.random.default_rng(18)
HEAD = ["stem", "stem_relu", "mix", "mix_relu"]  # the input region of depth 2


def stem_model(wide: int = 16, body: int = 4):
    """x [N, 3, 8, 8] -> stem (1x1, 3 -> 8) -> Relu -> mix (1x1, 8 -> wide) -> Relu -> body 3x3 convs ->
    y. The stem makes channel 0 of its output 100x the others and mix divides it back: between them one
    uint8 range leaves the seven ordinary channels a couple of steps, and only keeping both float (with
    the stem alone float, mix still reads the tensor quantized) removes that error. The stem and mix
    hold ~1 % of the multiply-accumulates."""
    stem = RNG.normal(size=(8, 3, 1, 1)).astype(np.float32)
    stem[0] *= 100.0
    mix = (RNG.normal(size=(wide, 8, 1, 1)) / np.sqrt(8)).astype(np.float32)
    mix[:, 0] /= 100.0
    weights = {"w_stem": stem, "w_mix": mix}
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["s"], name="stem"),
             helper.make_node("Relu", ["s"], ["sr"], name="stem_relu"),
             helper.make_node("Conv", ["sr", "w_mix"], ["m"], name="mix"),
             helper.make_node("Relu", ["m"], ["b0"], name="mix_relu")]
    for i in range(body):
        weights[f"w{i}"] = (RNG.normal(size=(wide, wide, 3, 3)) / np.sqrt(9 * wide)).astype(np.float32)
        last = i == body - 1
        nodes.append(helper.make_node("Conv", [f"b{i}", f"w{i}"], ["y" if last else f"c{i}"], name=f"body{i}",
                                      pads=[1, 1, 1, 1]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"b{i + 1}"], name=f"body{i}_relu"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", wide, 8, 8])], weights)


def _write(tmp_path, model, count: int = 16, rng: np.random.Generator = RNG):
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    samples = np.abs(rng.normal(size=(count, 1, 3, 8, 8)))  # positive: the stem's big channel stays wide
    return path, save_npy_folder(tmp_path / "data", samples)


def _recipe(setting: str) -> Recipe:
    # outliers off: the stem's output is an outlier tensor that `outliers` would equalize; here the
    # region choice alone is under test. 7-bit weights on every CPU: `reduce_range: auto` gives 8-bit
    # weights on VNNI CPUs only, and the SQNR figures asserted below would depend on the machine.
    return Recipe.model_validate({"quantization": {"placement": "fused", "weights": {"reduce_range": True},
                                                   "algorithms": {"keep_float": setting, "outliers": "off",
                                                                  "bias_correction": False}}})


def test_regions_grow_by_depth_from_each_end_within_the_budget(tmp_path):
    path, _ = _write(tmp_path, stem_model())
    model, _ = api.prepare(path)
    selection = select_tensors(model, fused_recipe())
    assert layers(model, selection) == ["stem", "mix", "body0", "body1", "body2", "body3"]
    shapes = {"s": (1, 8, 8, 8), "m": (1, 16, 8, 8), **{f"c{i}": (1, 16, 8, 8) for i in range(3)},
              "y": (1, 16, 8, 8)}
    macs = layer_macs(model, selection, shapes)
    assert macs["stem"] == 3 * 8 * 64 and macs["body0"] == 16 * 16 * 9 * 64
    regions = candidate_regions(model, selection, macs)
    # the output end: one body conv is 24 % of the MACs, past the budget; the input end stops at depth 2
    assert [(r.end, r.depth, r.layers) for r in regions] == [("input", 1, ("stem",)),
                                                             ("input", 2, ("stem", "mix"))]
    assert list(regions[1].nodes) == HEAD
    assert all(r.macs_fraction <= MAC_BUDGET for r in regions)


def test_auto_keeps_the_stem_float_reports_it_and_is_deterministic(tmp_path):
    path, data = _write(tmp_path, stem_model())
    results, models = {}, {}
    for setting in ("off", "auto", "auto"):
        result = api.quantize(path, data, _recipe(setting))
        if setting in models:
            assert result.model.SerializeToString() == models[setting]  # same inputs, byte-identical model
        models[setting], results[setting] = result.model.SerializeToString(), result
    assert Recipe().quantization.algorithms.keep_float == "off"  # the default, measured (README): centerface
    section = results["auto"].report["algorithms"]["keep_float"]
    assert section["enabled"] is True
    assert list(section["nodes"]) == HEAD
    [chosen] = section["chosen"]
    assert (chosen["end"], chosen["depth"], chosen["layers"]) == ("input", 2, ["stem", "mix"])
    assert chosen["gain_db"] >= 0.5 and chosen["macs_fraction"] <= MAC_BUDGET
    plan = {d["node"]: d for d in results["auto"].report["plan"]["nodes"]}
    assert all(not plan[node]["quantized"] and "keep_float auto" in plan[node]["reason"] for node in HEAD)
    assert all(plan[f"body{i}"]["quantized"] for i in range(4))
    # structure: no QuantizeLinear before the first body conv's input
    graph = results["auto"].model.graph
    quantized = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    assert not quantized & {"x", "s", "sr", "m"}
    off = results["off"].report["algorithms"]["keep_float"]
    assert off["enabled"] is False and off["nodes"] == {}
    sqnr = {k: r.report["validation"]["outputs"]["y"]["sqnr_db"] for k, r in results.items()}
    assert sqnr["auto"] > sqnr["off"] + 3, sqnr
    from qtool.reporting.markdown import render_markdown
    from qtool.reporting.schemas import report_schema

    assert "| keep_float | auto: worst output SQNR" in render_markdown(results["auto"].report)
    for result in results.values():
        jsonschema.Draft202012Validator(report_schema("report")).validate(result.report)


def test_an_accurate_plan_is_left_as_it_is(tmp_path):
    rng = np.random.default_rng(2)  # its own draws: the module's RNG state depends on which tests ran first
    model = stem_model()
    for init in model.graph.initializer:  # an ordinary net: no channel 100x the others, uniform weights
        fan_in = int(np.prod(init.dims[1:]))
        init.CopyFrom(numpy_helper.from_array(
            (rng.uniform(-1, 1, size=tuple(init.dims)) * np.sqrt(3 / fan_in)).astype(np.float32), init.name))
    path, data = _write(tmp_path, model, rng=rng)
    section = api.quantize(path, data, _recipe("auto")).report["algorithms"]["keep_float"]
    assert section["nodes"] == {} and section["chosen"] == [] and section["candidates"] == []
    assert section["worst_output_sqnr_db"]["without"] >= ACT_BELOW_DB  # int8 is accurate: no float region
    assert "nothing to lift" in section["why"]


def test_with_a_calibration_table_it_is_skipped_with_a_note(tmp_path):
    path, data = _write(tmp_path, stem_model(), count=4)
    table = api.calibrate(path, data, _recipe("auto"), tmp_path / "table.json")
    result = api.quantize(path, None, _recipe("auto"), calibration=table.output, validation_data=data)
    section = result.report["algorithms"]["keep_float"]
    assert section["enabled"] is False and "needs calibration data" in section["skipped"]
