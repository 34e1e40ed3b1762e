"""What a plan quantizes against what the recipe asked for: a node left with no quantized tensor
counts as float, and a run that quantizes nothing, or loses most of what it asked for to unusable
ranges, is refused (exit 2) instead of passing its gates on a float model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.errors import CalibrationError, DataError, ModelError
from qtool.quantization.kernel_costs import KEPT_FOR_SPEED, MIN_GAIN

if TYPE_CHECKING:
    from qtool.quantization.plan import NodeDecision, QuantPlan

NO_RANGE = "float: no usable range for"

# The share of the nodes a recipe quantizes that may lose every range before the run is refused:
# degenerate ranges come from masks and constants (a few tensors a model); past half, the data or
# the table is not what this model sees.
MAX_RANGELESS_SHARE = 0.5


def drop_rangeless(graph, nodes: list[NodeDecision], selected: dict, planned: dict) -> list[NodeDecision]:
    """Nodes whose every selected activation (inputs read, output written) got no usable range go
    float, weights included: they would run as float ops, whatever the headline said."""
    result = []
    for node, decision in zip(graph.node, nodes):
        if decision.quantized and not decision.weight_only and not decision.dynamic:
            tensors = [node.input[i] for i in decision.activation_inputs] + list(node.output[:1])
            wanted = [name for name in tensors if name in selected]
            if wanted and not any(name in planned for name in wanted):
                decision = replace(decision, quantized=False, reason=f"{NO_RANGE} {', '.join(wanted)} (see notes)",
                                   activation_inputs=(), weight_input=None, bias_input=None)
        result.append(decision)
    return result


def no_kernel_pays(plan: QuantPlan) -> bool:
    """Whether `placement: fast` kept every node of `plan` float for speed: nothing quantized, no node
    left without a range, and at least one kept float by the cost table."""
    return (not any(d.quantized for d in plan.nodes) and not any(d.reason.startswith(NO_RANGE) for d in plan.nodes)
            and any(d.reason.startswith(KEPT_FOR_SPEED) for d in plan.nodes))


def check_coverage(plan: QuantPlan, asked: int, *, model: Path, recipe: Path | None, ranges_from: Path | str,
                   table: bool) -> list[str]:
    """Refuse a plan that cannot stand for what the recipe asked (`asked`: the nodes it quantizes):
    nothing to quantize (the recipe and the model's fault), nothing worth quantizing (`placement: fast`
    keeps every node float for speed), or no usable range for most of it (the calibration data's or
    table's, `ranges_from`). Returns the warning for a smaller loss."""
    quantized = sum(d.quantized for d in plan.nodes)
    rangeless = sum(d.reason.startswith(NO_RANGE) for d in plan.nodes)
    slower = sum(d.reason.startswith(KEPT_FOR_SPEED) for d in plan.nodes)
    if asked and no_kernel_pays(plan):
        raise ModelError(f"{model}: no 8-bit kernel pays here: `placement: fast` estimates every node the recipe "
                         f"{recipe or '(built-in default)'} quantizes ({slower}) faster as float compute on ONNX "
                         f"Runtime's CPU kernels, conversions included, or 8-bit faster by less than the table can "
                         f"resolve (under {MIN_GAIN:.0%} of the float model's time), so an int8 model would not run "
                         "measurably faster than float; ship the float model, or set `quantization.placement: "
                         "fused` to quantize anyway; nothing written")
    if not asked or not (quantized or rangeless):
        reasons: dict[str, Counter] = {}
        for d in plan.nodes:
            reasons.setdefault(d.reason, Counter())[d.op_type] += 1
        shown = "; ".join(f"{', '.join(f'{op}×{n}' for op, n in ops.most_common())}: {reason}"
                          for reason, ops in sorted(reasons.items(), key=lambda item: -sum(item[1].values()))[:3])
        raise ModelError(f"{model}: nothing to quantize: none of its {len(plan.nodes)} nodes under recipe "
                         f"{recipe or '(built-in default)'} ({shown}); nothing written")
    planned = quantized + rangeless  # what the plan quantizes with ranges (placement has kept others float)
    if not quantized or rangeless > MAX_RANGELESS_SHARE * planned:
        degenerate = [note for note in plan.notes if "kept float" in note and "range" in note]
        error = CalibrationError if table else DataError
        raise error(f"{ranges_from}: no usable range for {rangeless} of the {planned} nodes the plan quantizes "
                    f"({quantized} left quantized), e.g. {'; '.join(degenerate[:2])}: every value the same, or a "
                    "scale that is zero, tiny or not finite; nothing written")
    if rangeless:
        return [f"{rangeless} of the {planned} nodes the plan quantizes kept float ({quantized} of the model's "
                f"{len(plan.nodes)} nodes quantized): no usable range from {ranges_from} (the plan's notes name "
                "each tensor)"]
    return []
