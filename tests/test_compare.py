"""`qtool compare`: per-output and per-layer figures, gates and their exit codes, JUnit, CI summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import ROOT, SAMPLE, make_model, save_npy_folder, fused_recipe
from qtool import api
from qtool.cli.main import main
from qtool.cli.terminal import milliseconds_text
from qtool.evaluation.per_layer import match_activations, weight_errors
from qtool.errors import UsageError


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def qtool(*args: str, env: dict | None = None) -> Ran:
    """In-process (fast); `qtool_process` where stdout must be the real one."""
    result = CliRunner().invoke(main, list(args), env={"GITHUB_STEP_SUMMARY": None, **(env or {})})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def qtool_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"})


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The sample model quantized once; both paths and an output root."""
    root = tmp_path_factory.mktemp("digits")
    api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", fused_recipe(), root / "int8",
                 validation_data=SAMPLE / "eval")
    return SAMPLE / "model.onnx", root / "int8" / "model.onnx", root


def compare_args(digits, output, *extra):
    reference, candidate, _ = digits
    return ["compare", str(reference), str(candidate), "--data", str(SAMPLE / "eval"), "--output", str(output),
            *extra]


def test_compare_per_output_per_layer_bench_and_passing_gates(digits, tmp_path):
    junit = tmp_path / "gates.xml"
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = qtool(*compare_args(digits, tmp_path / "out", "--per-layer", "--bench",
                                 "--gate", "min_cosine=0.99", "--gate", "max_accuracy_drop=0.01",
                                 "--gate", "min_size_ratio=3", "--gate", "max_latency_ratio=50",
                                 "--junit", str(junit)),
                   env={"GITHUB_STEP_SUMMARY": str(summary), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json", "report.md"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["command"] == "compare" and report["passed"] is True
    logits = report["validation"]["outputs"]["logits"]
    assert logits["cosine"] > 0.999 and logits["sqnr_db"] > 30
    assert logits["top1_agreement"] >= 0.99 and logits["top5_agreement"] == 1.0
    assert set(logits) >= {"mse", "max_abs_error", "mean_abs_error", "sample_sqnr_histogram"}
    assert sum(logits["sample_sqnr_histogram"]["counts"]) == 300
    assert report["validation"]["accuracy"]["labelled_samples"] == 300
    layers = report["layers"]
    assert len(layers["activations"]) >= 8 and layers["unmatched"] == 0
    sqnrs = [row["sqnr_db"] for row in layers["activations"]]
    assert sqnrs == sorted(sqnrs)  # worst first
    assert {row["op_type"] for row in layers["activations"]} >= {"Relu", "MaxPool"}
    convs = [row for row in layers["weights"] if row["tensor"].startswith("conv") and row["dtype"] == "int8"]
    assert len(convs) >= 2 and all(row["sqnr_db"] > 30 for row in convs)
    latency = report["latency"]
    # one thread without --threads, as quantize times: the two commands' ratios compare
    assert latency["threads"] == 1 and latency["reference"]["runs"] >= 10
    assert latency["reference"]["p10_ms"] <= latency["reference"]["median_ms"] <= latency["reference"]["p90_ms"]
    low, high = latency["ratio_interval"]  # the summary's row, as quantize's: the ratio is to the reference
    reference_ms, candidate_ms = (milliseconds_text(latency[model]["median_ms"]) for model in ("reference", "candidate"))
    assert (f"{reference_ms} → {candidate_ms} ms "
            f"({latency['ratio']:.2f}× reference, 95 % interval {low:.2f}–{high:.2f}") in result.stdout
    assert report["size"]["ratio"] > 3
    assert len(report["inputs"]["candidate"]["sha256"]) == 64
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert [c.get("name") for c in cases] == ["min_cosine", "max_accuracy_drop", "min_size_ratio", "max_latency_ratio"]
    assert not ET.parse(junit).getroot().findall(".//failure")
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "# qtool compare report — passed" in text
    assert "Worst layers" in (tmp_path / "out" / "report.md").read_text()


def test_too_strict_gate_exits_1_naming_it(digits, tmp_path):
    junit = tmp_path / "gates.xml"
    result = qtool(*compare_args(digits, tmp_path / "out", "--gate", "min_sqnr_db=90",
                                 "--gate", "min_top1_agreement=0.9", "--junit", str(junit), "-q"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("gate min_sqnr_db: FAILED")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(g["name"], g["passed"]) for g in report["gates"]] == [("min_sqnr_db", False), ("min_top1_agreement", True)]
    failures = ET.parse(junit).getroot().findall(".//testcase/failure")
    assert len(failures) == 1 and "min_sqnr_db" in failures[0].get("message")


def test_recipe_gates_apply_and_cli_overrides_them(digits, tmp_path):
    recipe = tmp_path / "gates.yaml"
    recipe.write_text("version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_cosine: 0.9999999, min_size_ratio: 2}\n")
    failed = qtool(*compare_args(digits, tmp_path / "a", "--recipe", str(recipe), "-q"))
    assert failed.returncode == 1 and "gate min_cosine: FAILED" in failed.stderr
    passed = qtool(*compare_args(digits, tmp_path / "b", "--recipe", str(recipe), "--gate", "min_cosine=0.99", "-q"))
    assert passed.returncode == 0, passed.stderr


def test_unknown_gate_is_a_usage_error_listing_the_names(digits, tmp_path):
    result = qtool(*compare_args(digits, tmp_path / "out", "--gate", "min_cosin=0.9"))
    assert result.returncode == 2
    assert "unknown gate 'min_cosin'; allowed: min_cosine, min_sqnr_db" in result.stderr
    assert not (tmp_path / "out").exists()


def test_json_prints_the_report_and_nothing_else(digits, tmp_path):
    result = qtool_process(*compare_args(digits, tmp_path / "out", "--json"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())


def test_quantize_report_gains_layers_with_recipe_rules(tmp_path):
    result = api.quantize(SAMPLE / "model.onnx", SAMPLE / "calib", fused_recipe(), tmp_path / "out",
                          validation_data=SAMPLE / "eval", per_layer=True)
    layers = result.report["layers"]
    assert layers["activations"] and layers["weights"]
    rules = {row["rule"] for row in layers["activations"] + layers["weights"]}
    assert "rule Conv" in rules
    assert (tmp_path / "out" / "report.html").is_file()


def _conv_relu_output_model():
    """Conv -> Relu where the Relu output is the graph output: qdq renames the producer's output."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])],
                      {"w": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
                       "b": rng.normal(size=4).astype(np.float32)})


def test_layers_match_through_qdq_including_renamed_graph_outputs(tmp_path):
    model = _conv_relu_output_model()
    onnx.save(model, str(tmp_path / "float.onnx"))
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(1).normal(size=(8, 1, 2, 6, 6)))
    result = api.quantize(tmp_path / "float.onnx", data, fused_recipe(), tmp_path / "q")
    quantized = result.model
    renamed = [node for node in quantized.graph.node if node.op_type == "QuantizeLinear"
               and node.input[0] not in {t for n in model.graph.node for t in n.output} | {"x"}]
    matches, unmatched = match_activations(model, quantized)
    by_tensor = {m.float_tensor: m for m in matches}
    assert unmatched == 0
    assert "x" in by_tensor
    if renamed:  # the graph output y got a Q/DQ pair: found by following the Q input back to its node
        assert by_tensor["y"].quantized_tensor == "y" and by_tensor["y"].node == "relu"
    weights = weight_errors(model, quantized)
    assert [(row["tensor"], row["node"], row["input"]) for row in weights if row["dtype"] == "int8"] == [("w", "conv", 1)]
    report = api.compare(tmp_path / "float.onnx", tmp_path / "q" / "model.onnx", data, per_layer=True).report
    assert {row["tensor"] for row in report["layers"]["activations"]} >= {"x"}


@pytest.fixture(scope="module")
def ppocr_cls(tmp_path_factory):
    """ppocr_cls (opset 11, Constant-node weights) quantized from its image folder with the ppocr_cls preset."""
    from conftest import shared_model

    folder = shared_model("ppocr_cls")
    root = tmp_path_factory.mktemp("ppocr_cls_compare")
    recipe = root / "ppocr_cls.yaml"  # the shipped recipe without its timing gate: this test checks accuracy
    recipe.write_text((ROOT / "qtool" / "recipe" / "presets" / "ppocr_cls.yaml").read_text().replace(", max_latency_ratio: 1.0", ""))
    api.quantize(folder / "model.onnx", folder / "calib", recipe, root / "int8", validation_data=folder / "eval")
    return folder / "model.onnx", root / "int8" / "model.onnx", folder / "eval", recipe, root


def test_ppocr_cls_compare_per_output_and_per_layer(ppocr_cls):
    reference, candidate, evaluation, recipe, root = ppocr_cls
    result = qtool("compare", str(reference), str(candidate), "--data", str(evaluation), "--recipe", str(recipe),
                   "--per-layer", "--gate", "max_accuracy_drop=0.05", "--output", str(root / "compare"), "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads((root / "compare" / "report.json").read_text())
    output = next(iter(report["validation"]["outputs"].values()))
    assert output["cosine"] > 0.95 and output["top1_agreement"] >= 0.9
    assert report["validation"]["accuracy"]["labelled_samples"] == 96
    layers = report["layers"]
    assert len(layers["activations"]) >= 50 and len(layers["weights"]) >= 50
    assert "Conv" in {row["op_type"] for row in layers["activations"]}
    assert (root / "compare" / "report.html").read_text().count("<svg") >= 4


def argmax_model(shift: float) -> onnx.ModelProto:
    """x [N, 6, 4] → (x + [0, 0, 0, shift]) → ArgMax over the last axis → int64 y [N, 6] and the float sum s."""
    return make_model(
        [helper.make_node("Add", ["x", "c"], ["z"]), helper.make_node("ArgMax", ["z"], ["y"], axis=2, keepdims=0),
         helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 6]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"])],
        {"c": np.array([0, 0, 0, shift], np.float32)},
    )


def test_integer_outputs_are_scored_by_exact_match(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 1, 6, 4)).astype(np.float32)
    data = save_npy_folder(tmp_path / "data", x)
    for name, shift in (("ref", 0.0), ("cand", 0.5)):
        onnx.save_model(argmax_model(shift), str(tmp_path / f"{name}.onnx"))
    result = api.compare(tmp_path / "ref.onnx", tmp_path / "cand.onnx", data,
                         gates={"min_exact_match": 0.9, "min_cosine": 0.5})
    flat = x.reshape(-1, 4)
    want = np.mean(np.argmax(flat, axis=1) == np.argmax(flat + [0, 0, 0, 0.5], axis=1))
    figures = result.report["validation"]["outputs"]
    assert 0 < want < 1 and figures["y"]["exact_match"] == pytest.approx(want)
    assert "exact_match" not in figures["s"] and "top1_agreement" not in figures["y"]
    gates = {gate.name: gate for gate in result.gates}
    assert gates["min_exact_match"].value == pytest.approx(want) and gates["min_exact_match"].passed is bool(want >= 0.9)
    assert gates["min_cosine"].value == pytest.approx(figures["s"]["cosine"])  # the class indices are not a signal


def test_gates_that_check_no_output_of_this_kind_are_not_applicable(tmp_path):
    x = np.random.default_rng(4).normal(size=(6, 1, 6, 4)).astype(np.float32)
    data = save_npy_folder(tmp_path / "data", x)
    for name, shift in (("ref", 0.0), ("cand", 0.5)):
        model = argmax_model(shift)
        del model.graph.output[1]  # only the int64 ArgMax
        onnx.save_model(model, str(tmp_path / f"{name}.onnx"))
    result = api.compare(tmp_path / "ref.onnx", tmp_path / "cand.onnx", data,
                         gates={"min_cosine": 0.99, "min_exact_match": 0.5})
    cosine, exact = result.gates
    assert (cosine.passed, cosine.value, cosine.describe()) == (
        True, None, "gate min_cosine: not applicable (every output is integer: min_exact_match scores them)")
    assert exact.value is not None and not exact.not_applicable
    assert result.report["gates"][0] == {"name": "min_cosine", "threshold": 0.99, "value": None, "passed": None,
                                         "not_applicable": "every output is integer: min_exact_match scores them"}
    floats = api.compare(SAMPLE / "model.onnx", SAMPLE / "model.onnx", SAMPLE / "calib",
                         gates={"min_exact_match": 0.9, "min_cosine": 0.99})
    assert floats.passed and floats.gates[0].not_applicable == "no integer output"
    with pytest.raises(UsageError, match="min_exact_match cannot be measured on this model .every output of it is float"):
        api.compare(SAMPLE / "model.onnx", SAMPLE / "model.onnx", SAMPLE / "calib", gates={"min_exact_match": 0.9})


def test_a_recipe_whose_every_accuracy_gate_is_not_applicable_is_refused(tmp_path):
    """A MatMul classifier whose one output is its ArgMax: min_cosine reads no output, so a recipe gated on it
    alone would pass on nothing (exit 0 with `min_cosine n/a pass` before). Exit 2 asking for min_exact_match,
    as tune does; beside a measurable gate it is reported not applicable (passed null), never passed."""
    rng = np.random.default_rng(5)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"),
                        helper.make_node("ArgMax", ["z"], ["y"], axis=1, keepdims=0)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, ["N"])],
                       {"w": rng.normal(size=(8, 4)).astype(np.float32)})
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    data = save_npy_folder(tmp_path / "data", rng.normal(size=(8, 1, 8)).astype(np.float32))
    (tmp_path / "cosine.yaml").write_text("version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_cosine: 0.99, min_size_ratio: 1.0}\n")
    refused = qtool("quantize", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "cosine.yaml"),
                    "--data", str(data), "--output", str(tmp_path / "out"), "--no-bench")
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    assert "cosine.yaml: validation.gates: model.onnx: min_cosine cannot be measured on this model (every output of it " \
           "is integer" in refused.stderr and "gate it with min_exact_match" in refused.stderr
    (tmp_path / "both.yaml").write_text("version: 1\nquantization: {placement: fused}\nvalidation:\n  gates: {min_cosine: 0.99, min_exact_match: 0.5}\n")
    ran = qtool("quantize", str(tmp_path / "model.onnx"), "--recipe", str(tmp_path / "both.yaml"), "--data", str(data),
                "--output", str(tmp_path / "out"), "--no-bench", "--junit", str(tmp_path / "junit.xml"))
    assert ran.returncode == 0, ran.stderr
    cosine, exact = json.loads((tmp_path / "out" / "report.json").read_text())["gates"]
    assert cosine["passed"] is None and cosine["not_applicable"].startswith("every output is integer")
    assert exact["passed"] is True and "not_applicable" not in exact
    assert "| min_cosine | 0.99 | n/a | not applicable (every output is integer" in (tmp_path / "out" / "report.md").read_text()
    assert "not applicable" in ran.stdout
    suite = ET.parse(tmp_path / "junit.xml").getroot()[0]
    assert (suite.get("skipped"), suite.get("failures")) == ("1", "0") and suite.find("testcase/skipped") is not None


def matmul_chain(widths: list[int], seed: int = 0) -> onnx.ModelProto:
    """x [N, widths[0]] -> MatMul ... -> y [N, widths[-1]], weights scaled to keep values near 1."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], {}, "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"/mm{i}"))
        prev = out
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", widths[-1]])], inits)


def test_compare_bench_warns_when_the_candidate_is_slower_than_float(tmp_path):
    """As quantize does: a candidate slower than its reference (here ~100x the arithmetic) is a report
    warning, printed with the summary, and on stderr under --json."""
    onnx.save(matmul_chain([16, 16]), tmp_path / "fast.onnx")
    onnx.save(matmul_chain([16] + [256] * 12 + [16]), tmp_path / "slow.onnx")
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(0).normal(size=(4, 1, 16)))
    ran = qtool("compare", str(tmp_path / "fast.onnx"), str(tmp_path / "slow.onnx"), "--data", str(data),
                "--bench", "--json", "--output", str(tmp_path / "out"))
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["latency"]["ratio"] > 1.0
    slower = [w for w in report["warnings"] if w.startswith("the candidate is slower than the reference: latency")]
    assert slower and f"warning: {slower[0]}" in ran.stderr
    text = qtool("compare", str(tmp_path / "fast.onnx"), str(tmp_path / "slow.onnx"), "--data", str(data),
                 "--bench", "--output", str(tmp_path / "out2")).stdout
    assert "the candidate is slower than the reference" in text


@pytest.mark.parametrize("command", ["compare", "quantize"])
def test_more_bench_threads_than_cpus_is_refused_before_any_work(tmp_path, command):
    """New-user finding: `compare --bench --threads 99999` never ended and outlived SIGTERM (timeout 120 ran
    20 minutes); a thread count past this machine's CPUs now exits 2 at once, nothing written."""
    too_many = (os.cpu_count() or 1) + 1
    model = str(SAMPLE / "model.onnx")
    head = ["compare", model, model] if command == "compare" else ["quantize", model]
    result = CliRunner().invoke(main, [*head, "--data", str(SAMPLE / "calib"), "--output", str(tmp_path / "o"),
                                       "--bench", "--threads", str(too_many)])
    assert result.exit_code == 2
    assert f"--threads {too_many}: the bench runs on this machine, which has {too_many - 1} logical CPUs" in result.stderr
    assert not (tmp_path / "o").exists()


def test_top1_agreement_gate_fails_on_a_constant_classifier_output(tmp_path):
    """Both models give equal scores to every class: argmax reads class 0 for every sample in both, which
    is no agreement evidence; the gate must fail with a warning, not pass at 100 %."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    flat = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [x], [y], {"w": np.zeros((8, 4), np.float32)})
    for name in ("a", "b"):
        onnx.save(flat, str(tmp_path / f"{name}.onnx"))
    data = save_npy_folder(tmp_path / "data", np.random.default_rng(0).normal(size=(6, 1, 8)))
    result = api.compare(tmp_path / "a.onnx", tmp_path / "b.onnx", data, gates={"min_top1_agreement": 0.9})
    assert [(g.name, g.value, g.passed) for g in result.gates] == [("min_top1_agreement", None, False)]
    figures = result.report["validation"]["outputs"]["y"]
    assert "top1_agreement" not in figures and figures["top1_ties"] == 6
    assert [w for w in result.report["warnings"] if "tie" in w] == [
        "output y: the reference's top-1 is a tie (equal top scores: a constant output?) on 6 of 6 samples: "
        "top-1 agreement cannot be measured (a min_top1_agreement gate fails); check the model and its input "
        "preprocessing"]
