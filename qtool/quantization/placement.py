"""Fused placement: keep float the nodes whose Q/DQ pairs buy no integer kernel in ONNX Runtime.

A planned node that ORT's optimizer leaves as its float op type, still reading
a DequantizeLinear, runs float compute between conversions: the Q/DQ pairs
around it cost time and add rounding. `place` asks ORT which nodes those are,
keeps them float and plans again, until none is left.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable, TensorRange
from qtool.io.model import GraphIndex
from qtool.io.samples import DataSource
from qtool.numerics import QTYPES
from qtool.quantization.plan import NodeDecision, QuantPlan, Selection, build_plan, select_tensors
from qtool.quantization.hard_swish import fuse_hard_swish
from qtool.quantization.kernel_costs import FITTED_ON, KEPT_FOR_SPEED, MIN_GAIN, slower_regions, table_applies
from qtool.quantization.qdq import apply_plan
from qtool.quantization.rules import RULES
from qtool.recipe.schema import Recipe
from qtool.runtime.session import INTEGER_OP_TYPES, optimized_graph, runtime_source, session_options, tensor_shapes

TOKEN = re.compile(r"_token_\d+$")  # ORT's layout pass renames a node it replaces: <name>_token_<n>
MAX_ROUNDS = 8  # each round keeps at least one more node float; real models settle in 2-3
NOT_FUSED = "placement fused: ONNX Runtime runs it as float {op} between Q/DQ (no integer kernel)"
ISLAND = ("placement fused: {kernel} would read only values quantized from float and write only values "
          "dequantized back: the conversions cost more than the integer {op} saves")
ROUND_TRIP = ("placement fused: {op} between float nodes: its Q/DQ pair would only round, no integer kernel "
              "writes or reads it")
SLOWER = (KEPT_FOR_SPEED + " slower than float here: a group of {count} node(s) estimated "
          "{int8:.0f} µs as 8-bit kernels vs {float:.0f} µs float, conversions included (kernel_costs table)")
NOT_MEASURABLE = (KEPT_FOR_SPEED + " not measurably faster here: the {count} node(s) left estimated {int8:.0f} µs "
                  "as 8-bit kernels vs {float:.0f} µs float, conversions included, saving under {share:.0%} of the "
                  "float model's {model:.0f} µs: within the kernel_costs table's error")


@dataclass(frozen=True)
class Placement:
    plan: QuantPlan
    model: ModelProto  # the quantized model of `plan`
    kept_float: dict[str, str]  # node -> why the placement pass kept it float
    rounds: int


def fusion_graph(model: ModelProto) -> onnx.GraphProto:
    """The graph after ORT's fusions up to QDQ -> QLinear* (extended level: no layout passes, so
    nodes keep their names)."""
    options = session_options(optimize=True, threads=1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="qtool-placement-") as folder:
        path = Path(folder) / "fused.onnx"
        options.optimized_model_filepath = str(path)
        with runtime_source(model, options) as source:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path), load_external_data=False).graph


def unfused_nodes(quantized: ModelProto, plan: QuantPlan) -> dict[str, str]:
    """Planned compute nodes ORT leaves as float ops reading a DequantizeLinear output, and weightless
    ones it fuses into an integer kernel with float on every side (an island), and Relu/Clip nodes
    between float nodes (float_sandwiched) -> reason.

    Data-movement ops (shared scale) are left alone: their outputs take their input's range, which
    is what lets ORT drop their Q/DQ; Relu/Clip are folded into their producer's range; nodes with
    16-bit or 4-bit types never get an integer kernel and stay as the recipe asks.
    """
    graph = fusion_graph(quantized)
    producer = {out: node.op_type for node in graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    after = {node.name: node for node in graph.node}
    unfused = {}
    for decision in plan.nodes:
        rule = RULES.get(decision.op_type)
        if (not decision.quantized or decision.weight_only or decision.dynamic or rule is None or rule.output != "own"
                or rule.fuses_into_producer or not _has_int8_kernel_types(decision)):
            continue
        node = after.get(decision.node)
        if node is None:
            continue  # folded away
        if node.op_type == decision.op_type:
            if any(producer.get(name) == "DequantizeLinear" for name in node.input):
                unfused[decision.node] = NOT_FUSED.format(op=decision.op_type)
        elif decision.weight_input is None and _island(node, producer, readers):
            unfused[decision.node] = ISLAND.format(op=decision.op_type, kernel=node.op_type)
    return {**unfused, **float_sandwiched(quantized, plan)}


def float_sandwiched(quantized: ModelProto, plan: QuantPlan) -> dict[str, str]:
    """Planned Relu/Clip nodes (their range stands for their producer's) whose producer is float, or a graph
    input, and whose readers are all float nodes -> why. ONNX Runtime removes such a Relu before its
    QuantizeLinear and runs the pair as two conversions that only round (ppocr_det's head: BatchNormalization
    -> Relu -> ConvTranspose, 400 µs of Q/DQ on 64x160x160)."""
    decisions = {d.node: d for d in plan.nodes}
    index = GraphIndex(quantized.graph)
    outputs = index.graph_outputs

    def final_readers(tensor: str) -> list[onnx.NodeProto] | None:
        """The nodes reading `tensor` through Q/DQ; None where a graph output is on the way."""
        found = []
        for reader in index.consumers.get(tensor, []):
            if reader.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                found.append(reader)
            elif reader.output[0] in outputs:
                return None
            else:
                more = final_readers(reader.output[0])
                if more is None:
                    return None
                found += more
        return found

    def is_float(node: onnx.NodeProto | None) -> bool:
        decision = decisions.get(node.name) if node is not None else None
        return node is None or (decision is not None and not decision.quantized)

    sandwiched = {}
    for node in quantized.graph.node:
        decision = decisions.get(node.name)
        rule = RULES.get(node.op_type)
        if decision is None or not decision.quantized or rule is None or not rule.fuses_into_producer:
            continue
        source = index.producer.get(node.input[0])
        after = final_readers(node.output[0]) if node.output[0] not in outputs else None
        if is_float(source) and after and all(is_float(reader) for reader in after):
            sandwiched[node.name] = ROUND_TRIP.format(op=node.op_type)
    return sandwiched


def float_nodes_on_integer_kernels(optimized: onnx.GraphProto, plan: QuantPlan) -> list[str]:
    """A warning naming the nodes the plan keeps float that ORT runs as integer kernels anyway; [] if none.
    `optimized`: the quantized model's graph as ORT runs it (runtime.session.optimized_graph, the session
    the report's kernel histogram comes from too).

    ORT fuses DequantizeLinear -> op -> QuantizeLinear into the op's integer kernel whether or not
    the plan quantized the op: a float node between a quantized producer and a quantized reader
    (an override's Add, Mul, GlobalAveragePool...) computes in 8 bits. Float Conv, ConvTranspose
    and Gemm are kept float by qdq.apply_plan; these others are reported.
    """
    kept_float = {decision.node for decision in plan.nodes if not decision.quantized and decision.node}
    fused = [f"{node.name} ({node.op_type})" for node in optimized.node
             if node.name in kept_float and node.op_type in INTEGER_OP_TYPES]
    if not fused:
        return []
    return [f"{len(fused)} node(s) the plan keeps float run as integer kernels in ONNX Runtime, which fuses "
            f"DequantizeLinear -> op -> QuantizeLinear whatever the recipe says: {', '.join(fused[:5])}"
            + (", ..." if len(fused) > 5 else "") + "; keep their quantized neighbours float too for float compute"]


def _island(node: onnx.NodeProto, producer: dict[str, str], readers: dict[str, list[str]]) -> bool:
    """An integer kernel fed only by standalone QuantizeLinear (from float) and read only by
    DequantizeLinear (back to float): the conversions cost more than a weightless op saves."""
    inputs = [name for name in node.input if name in producer]  # scales and zero points are initializers
    outputs = [name for name in node.output if name]
    return bool(inputs) and all(producer[name] == "QuantizeLinear" for name in inputs) and all(
        readers.get(name) and all(op == "DequantizeLinear" for op in readers[name]) for name in outputs)


def _has_int8_kernel_types(decision: NodeDecision) -> bool:
    """8-bit activations and 8-bit per-tensor/per-channel weights: the only types ORT has integer
    kernels for. Wider or blocked types are a recipe's choice of simulated precision: left as planned."""
    if decision.activations is None or QTYPES[decision.activations.dtype].bits > 8:
        return False
    weights = decision.weights
    return decision.weight_input is None or weights is None or (
        QTYPES[weights.dtype].bits == 8 and weights.granularity != "per_block")


def place(build: Callable[[dict[str, str]], tuple[QuantPlan, ModelProto]],
          slower: Callable[[QuantPlan, ModelProto], dict[str, str]] | None = None) -> Placement:
    """Plan, ask ORT what it fuses, keep the unfused nodes float, plan again; until stable. Then,
    once, keep float what `slower(plan)` names (integer kernels estimated slower than float) and
    settle again.

    `build(keep_float)` returns the plan and quantized model with those nodes kept float.
    """
    kept: dict[str, str] = {}
    plan, model = build(kept)
    for rounds in range(1, MAX_ROUNDS + 1):
        more = {node: why for node, why in unfused_nodes(model, plan).items() if node not in kept}
        if not more and slower is not None:
            more = {node: why for node, why in slower(plan, model).items() if node not in kept}
            slower = None
        if not more:
            return Placement(plan, model, kept, rounds)
        kept.update(more)
        plan, model = build(kept)
    return Placement(plan, model, kept, MAX_ROUNDS)


def slower_than_float(model: ModelProto, shapes: dict[str, tuple[int, ...]]
                      ) -> Callable[[QuantPlan, ModelProto], dict[str, str]]:
    """`place`'s second step: the planned 8-bit nodes of `model` that kernel_costs.slower_regions keeps
    float on the tensor shapes of one sample -> why (the group's estimated µs both ways). Which kernels
    ORT runs in its NHWC integer chain is read from the quantized model's optimized graph."""
    def slower(plan: QuantPlan, quantized: ModelProto) -> dict[str, str]:
        integer = [d.node for d in plan.nodes if d.quantized and not d.weight_only and not d.dynamic
                   and _has_int8_kernel_types(d)]
        nhwc = {TOKEN.sub("", node.name) for node in optimized_graph(quantized).node if node.op_type.startswith("Nhwc")}
        kept = {}
        for group in slower_regions(model.graph, integer, shapes, nhwc):
            why = (NOT_MEASURABLE if group.model_float_us else SLOWER).format(
                count=len(group.nodes), int8=group.int8_us, float=group.float_us, share=MIN_GAIN,
                model=group.model_float_us)
            kept.update(dict.fromkeys(group.nodes, why))
        return kept
    return slower


def with_fast_shapes(model: ModelProto, recipe: Recipe, table: CalibrationTable, data: DataSource | None
                     ) -> CalibrationTable:
    """`table` with the tensor shapes of one sample of `data` (runtime.session.tensor_shapes), which
    `placement: fast` estimates kernel costs from; unchanged for the other placements or without data."""
    if recipe.quantization.placement != "fast" or data is None:
        return table
    return replace(table, shapes=tensor_shapes(model, next(data.batches(1)).feeds))


def plan_and_apply(model: ModelProto, recipe: Recipe, selection: Selection, table: CalibrationTable,
                   saturating_host: bool) -> Placement:
    """The recipe's plan applied to `model`, with `quantization.placement` carried out.

    `selection` is the recipe's own (what was calibrated); nodes the pass keeps float only
    need fewer ranges, never new ones.
    """
    def build(keep_float: dict[str, str]) -> tuple[QuantPlan, ModelProto]:
        chosen = select_tensors(model, recipe, {**selection.kept_float, **keep_float}) if keep_float else selection
        plan = build_plan(model, recipe, chosen, table, saturating_host)
        return plan, apply_plan(model, plan)

    if recipe.quantization.placement == "all":
        plan, quantized = build({})
        return Placement(plan, quantized, {}, 0)
    fast = recipe.quantization.placement == "fast" and table.shapes
    fitted = table_applies(ort.__version__)
    placed = place(build, slower_than_float(model, table.shapes) if fast and fitted else None)
    if fast and not fitted:
        note = (f"placement fast planned as fused: its cost table was measured on ONNX Runtime "
                f"{'.'.join(map(str, FITTED_ON))}, which fuses and lays out integer kernels differently from "
                f"this {ort.__version__}; time the model (qtool compare --bench)")
        placed = replace(placed, plan=replace(placed.plan, notes=[*placed.plan.notes, note]))
    if placed.kept_float:
        slower = " or as integer kernels slower than float" if fast and fitted else ""
        note = (f"placement {recipe.quantization.placement}: {len(placed.kept_float)} node(s) kept float that "
                f"ONNX Runtime would run as float ops between Q/DQ{slower} ({placed.rounds} round(s))")
        placed = replace(placed, plan=replace(placed.plan, notes=[*placed.plan.notes, note]))
    rewritten, count = fuse_hard_swish(placed.model, placed.plan)
    if count:
        note = (f"{count} hard-swish(es) written out in float ops (x * clip(x + 3, 0, 6)) run as HardSwish, which "
                "ONNX Runtime fuses into the float Conv before it")
        placed = replace(placed, model=rewritten, plan=replace(placed.plan, notes=[*placed.plan.notes, note]))
    return placed


BOUNDED_BELOW = {"Relu": (0.0, None), "Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0)}


def preview_plan(model: ModelProto, recipe: Recipe, selection: Selection, saturating_host: bool,
                 data: DataSource | None = None) -> Placement:
    """The plan `quantize` would carry out and its model, without calibrating (`qtool inspect`, `qtool init`'s
    latency probe): `plan_and_apply` itself, on
    placeholder ranges for the tensors the recipe calibrates, and for `placement: fast` the tensor shapes
    of `data`'s first sample (without `data`, fast plans as fused). What ORT fuses depends on two things about
    ranges, which the placeholders keep: no two tensors share a scale (ORT drops a DequantizeLinear ->
    QuantizeLinear pair of equal scales), and a Relu's, Clip's or Sigmoid's output range lies within what
    the op can produce (ORT removes the Relu/Clip before a QuantizeLinear only then, and fuses its producer).
    Decisions that read measured values (a degenerate tensor kept float, a Concat of far-apart inputs
    split) can still differ after calibration."""
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name: init for init in model.graph.initializer}
    ranges = {}
    for i, name in enumerate(selection.calibration_tensors):
        spread = (i % 997) / 8192  # no two scales equal
        lo, hi = -1.0, 1.0 + spread
        node = producers.get(name)
        if node is not None and node.op_type in BOUNDED_BELOW:
            lo, top = BOUNDED_BELOW[node.op_type]
            hi = top - spread if top is not None else hi
        elif node is not None and node.op_type == "Clip":
            low, high = (float(onnx.numpy_helper.to_array(constants[x])) if x in constants else None
                         for x in (list(node.input[1:3]) + ["", ""])[:2])
            lo = lo if low is None else low
            hi = min(hi, high) - spread / 2 if high is not None else hi
            hi = hi if hi > lo else lo + 1.0 + spread
        ranges[name] = TensorRange(lo, hi, "placeholder")
    table = with_fast_shapes(model, recipe, CalibrationTable(ranges, 1), data)
    return plan_and_apply(model, recipe, selection, table, saturating_host)
