"""What sensitivity and tune share: one calibration and one float run that every trial reads, the
ranking pass, its cache, and the report rows of a trial."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto

from qtool.api import prepare
from qtool.calibration.calibrate import CalibrationTable, calibrate as calibrate_tensors
from qtool.distributed.ray_executor import LostTask
from qtool.errors import RecipeError, UsageError
from qtool.evaluation.bias_choice import correct_bias
from qtool.evaluation.labels import check_label_range, label_warnings, labels_source
from qtool.evaluation.method_choice import choose_method
from qtool.evaluation.metrics import is_classifier_output, top1
from qtool.evaluation.validation import check_gates_are_measurable, resolve_validation_data
from qtool.io.data import model_inputs
from qtool.io.external import scratch
from qtool.io.feeds import open_data
from qtool.io.samples import DataSource
from qtool.io.targets import begins_like
from qtool.io.model import file_sha256, model_file_bytes, save_model
from qtool.numerics import QTYPES
from qtool.quantization.algorithms.bias_correction import LayerShift, measure_shifts, weight_keys
from qtool.quantization.coverage import check_coverage
from qtool.quantization.placement import plan_and_apply, with_fast_shapes
from qtool.quantization.precedence import unmatched_overrides
from qtool.quantization.plan import build_plan, select_tensors, tensor_types
from qtool.recipe.schema import Recipe
from qtool.reporting import document as reporting
from qtool.runtime.session import current_providers, int8_kernels_may_saturate, make_session, run
from qtool.runtime.streams import StateCarry
from qtool.search.executor import Executor
from qtool.search.promote import objective, objective_name
from qtool.search.trial import (FLOAT_MODEL, QUANTIZED_NOTHING, TrialContext, TrialResult, TrialSpec,
                                float_model_name, promotion_overrides, rank_nodes, run_trial, with_overrides, worst,
                                write_eval_set)


@dataclass
class TrialSetup:
    context: TrialContext
    model: ModelProto  # the prepared float model (past 2 GB its graph only: its work files are gone)
    prepare_notes: list[str]
    calib_data: DataSource
    eval_data: DataSource
    warnings: list[str]
    quantizable: list[str]  # nodes the recipe quantizes and placement leaves quantized, graph order
    op_types: dict[str, str]
    unnamed: int  # quantized nodes without a name: no recipe can single them out
    calibration_s: float
    bias_correction: bool  # what the trials do, the tuned recipe's quantization.algorithms.bias_correction
    integer_only: bool = False  # every output is integer (an ArgMax's tags): trials are scored by exact match
    # per float output, each evaluation sample's mean square (the float reference a trial's SQNR divides by)
    sample_power: dict[str, list[float]] = field(default_factory=dict)
    # node -> its graph neighbours, and the nodes the recipe's selection quantizes (unnamed ones as
    # "#<index>"), for the search's neighbourhood moves (search.promote)
    neighbours: dict[str, frozenset[str]] | None = None
    quantized_keys: frozenset[str] = frozenset()
    weighted: frozenset[str] = frozenset()  # quantized nodes with a stored weight (Conv, Gemm, MatMul)


def setup_trials(model_path: Path, data_dir: Path, recipe: Recipe, folder: Path, validation_data, labels,
                  threads: int | None, tick) -> TrialSetup:
    """Prepare, calibrate once (every tensor a trial may quantize), run the float model over the
    evaluation data, and leave what trials read in `folder`. Past 2 GB the work files its sessions
    needed (a copy of the input's weights: qtool.io.external) are removed when it returns: the
    result's `model` is for its graph; trials read the float model written into `folder`."""
    with scratch():
        return _setup_trials(model_path, data_dir, recipe, folder, validation_data, labels, threads, tick)


def _setup_trials(model_path: Path, data_dir: Path, recipe: Recipe, folder: Path, validation_data, labels,
                  threads: int | None, tick) -> TrialSetup:
    started = time.perf_counter()
    model, prepare_notes = prepare(model_path, recipe)
    inputs = model_inputs(model)
    calib_data = open_data(data_dir, inputs, recipe.calibration.samples, recipe)
    eval_data, eval_labels, warnings = resolve_validation_data(recipe, calib_data, inputs, validation_data, labels)
    warnings = reporting.with_data_notes(warnings, calib_data, eval_data)
    check_gates_are_measurable(recipe, eval_labels)
    warnings += unmatched_overrides(model.graph, recipe.quantization)
    selection = select_tensors(model, recipe)
    quantized = [(node, d) for node, d in zip(model.graph.node, selection.nodes) if d.quantized]
    initializers = {init.name for init in model.graph.initializer}
    float_tensors = {name for name, kind in tensor_types(model).items() if kind == TensorProto.FLOAT} - initializers
    tensors = set(selection.calibration_tensors)
    for node, _ in quantized:  # alone, a node's output gets its own Q/DQ even where the full plan fuses it
        tensors |= {name for name in list(node.input) + list(node.output) if name in float_tensors}
    act = recipe.quantization.activations
    spec = recipe.calibration
    table = calibrate_tensors(model, sorted(tensors), calib_data, spec, QTYPES[act.dtype], act.symmetric,
                              tick("calibrate"))
    if spec.method == "auto":  # the recipe's tensors choose as `qtool quantize` does; the others keep minmax
        table = choose_method(model, recipe, selection, table, int8_kernels_may_saturate(), calib_data)
        prepare_notes = [*prepare_notes, f"{table.notes[-1]}, for every trial"]  # a note, as quantize says it
    table = with_fast_shapes(model, recipe, table, calib_data)  # as quantize measures them
    saturating = int8_kernels_may_saturate()
    placed = plan_and_apply(model, recipe, selection, table, saturating)
    # a recipe quantize refuses (nothing to quantize, nothing that pays, no usable ranges) is refused here too
    warnings += check_coverage(placed.plan, len(quantized), model=model_path, recipe=recipe.source,
                               ranges_from=calib_data.folder, table=False)
    save_model(model, folder / FLOAT_MODEL)
    # What sensitivity ranks and tune promotes: the nodes quantize would quantize, not those its
    # placement pass always keeps float (ppocr_cls's 9 HardSigmoid: no integer kernel)
    ranked = [(node, d) for node, d in quantized if not node.name or node.name not in placed.kept_float]
    named = [node.name for node, _ in ranked if node.name]
    a16 = with_overrides(recipe, promotion_overrides([(name, "a16") for name in named], act.dtype)) if named else recipe
    a16_model = model if float_model_name(a16) == FLOAT_MODEL else prepare(model_path, a16)[0]
    if a16_model is not model:
        save_model(a16_model, folder / float_model_name(a16))
    bias, shifts = None, None
    if recipe.quantization.algorithms.bias_correction:  # decided once, on the recipe's own plan
        _, _, bias = correct_bias(model, recipe, selection, table, saturating, placed.plan, placed.model, calib_data)
        prepare_notes = [*prepare_notes, f"bias_correction {'kept' if bias.kept else 'off'} for every trial: "
                                          f"{bias.as_dict()['why']}"]
        if bias.kept:
            shifts = (bias.shifts, *_a16_weight_shifts(model, recipe, a16_model, a16, table, saturating, calib_data))
    session = make_session(model, threads=threads)
    batches = []
    carry = StateCarry(eval_data.state)  # a stateful model's streams: trials carry their own state likewise
    scored = Counter()  # the float model's top-1 on the labelled samples: warned about at chance
    for batch in eval_data.batches(recipe.calibration.batch_size):
        reference = carry.run(partial(run, session), batch)
        truth = [eval_labels.get(name, -1) if eval_labels else -1 for name in batch.files]
        batches.append((batch.feeds, reference, truth, batch.starts[0] if batch.starts else None))
        _score_float(scored, eval_labels, batch.files, reference, truth)
    if eval_labels:
        warnings += label_warnings(scored["samples"], scored["labelled"],
                                   scored["correct"] / scored["labelled"] if scored["labelled"] else None,
                                   scored["classes"], labels_source(eval_labels))
    integer_only = bool(batches) and not any(np.asarray(value).dtype.kind == "f" for value in batches[0][1].values())
    power: dict[str, list[float]] = {}
    for _, reference, _, _ in batches:  # samples along axis 0, as a trial's first N are taken
        for name, value in reference.items():
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.ndim:
                power.setdefault(name, []).extend(np.mean(np.square(value.reshape(len(value), -1), dtype=np.float64),
                                                          axis=1).tolist() if value.size else [])
    write_eval_set(folder, batches, eval_data.state.carry if eval_data.state else None)
    context = TrialContext(str(folder), recipe, table, saturating, dict(recipe.validation.gates),
                           model_file_bytes(model_path), threads, current_providers(),
                           mask_input=eval_data.mask_input,
                           bias_shifts=shifts)
    keys = frozenset(node.name or f"#{i}" for i, (node, d) in enumerate(zip(model.graph.node, selection.nodes))
                     if d.quantized)
    return TrialSetup(context, model, prepare_notes, calib_data, eval_data, warnings, named,
                       {node.name: node.op_type for node, _ in ranked}, len(ranked) - len(named),
                       time.perf_counter() - started, bias is not None and bias.kept, integer_only, power,
                       node_neighbours(model), keys,
                       frozenset(node.name for node, d in quantized if node.name and d.weight_input is not None))


def _a16_weight_shifts(model: ModelProto, recipe: Recipe, a16_model: ModelProto, a16: Recipe, table: CalibrationTable,
                       saturating: bool, data: DataSource) -> tuple[dict[str, LayerShift], ...]:
    """Bias shifts for the weights layers get when promoted to 16-bit activations (`a16`: every ranked
    node promoted, on its float model), measured only where they differ from the recipe's: on x86 CPUs
    without VNNI 8-bit activations take 7-bit weights (reduce_range auto) and 16-bit ones 8-bit
    weights, so a promoted layer's shift is another measurement. () when no layer's weights differ."""
    keys = weight_keys(model, build_plan(model, recipe, select_tensors(model, recipe), table, saturating))
    a16_selection = select_tensors(a16_model, a16)
    a16_keys = weight_keys(a16_model, build_plan(a16_model, a16, a16_selection, table, saturating))
    if all(keys.get(name) == key for name, key in a16_keys.items()):
        return ()
    return (measure_shifts(a16_model, a16, a16_selection, table, saturating, data, recipe.calibration.batch_size),)


def _score_float(scored: Counter, labels: dict | None, files: list[str], reference: dict, truth: list[int]) -> None:
    """Add one batch's float top-1 to `scored`, refusing labels the first output cannot produce."""
    scored["samples"] += len(files)
    first = next(iter(reference), None)
    if not labels or first is None or not is_classifier_output(np.asarray(reference[first])):
        return
    scores = np.asarray(reference[first])
    scored["classes"] = scores.shape[1]
    check_label_range(labels, files, scores.shape[1], first)
    known = np.asarray(truth) >= 0
    scored["labelled"] += int(known.sum())
    scored["correct"] += int(np.sum(top1(scores)[known] == np.asarray(truth)[known]))


def node_neighbours(model: ModelProto) -> dict[str, frozenset[str]]:
    """Node -> the nodes that produce its inputs or read its outputs (top graph only). A node without a
    name is keyed "#<index>" (no recipe can name it, but it still sits between two others)."""
    graph = model.graph
    keys = [node.name or f"#{i}" for i, node in enumerate(graph.node)]
    producer = {out: key for key, node in zip(keys, graph.node) for out in node.output if out}
    readers: dict[str, set[str]] = {}
    for key, node in zip(keys, graph.node):
        for name in node.input:
            if name in producer:
                readers.setdefault(name, set()).add(key)
    return {key: frozenset({producer[n] for n in node.input if n in producer}
                           | {r for out in node.output for r in readers.get(out, ())}) - {key}
            for key, node in zip(keys, graph.node)}


COARSE_SAMPLES = 8  # below it a ranking is coarse (measured: see check_ranking_samples)
NEAR_ZERO = 0.01  # the first N samples' mean square, against all samples': below it they carry no signal


def algorithms_the_trials_skip(recipe: Recipe) -> list[str]:
    """A warning when the recipe asks for keep_float auto, which no trial runs (the promotions decide what
    is float) and the tuned recipe turns off: every trial, "recipe as given" included, then differs from
    `qtool quantize` of this recipe ([] otherwise). outliers auto, the default, goes unsaid: it changes a
    tensor on few models (one of the shared ones)."""
    if recipe.quantization.algorithms.keep_float != "auto":
        return []
    return ["the trials run without the recipe's keep_float auto (recipe.tuned.yaml sets it off): 'recipe as "
            "given' is the recipe without it, and its figures are not those of `qtool quantize` with this recipe"]


def check_ranking_samples(setup: TrialSetup, samples: int | None, option: str) -> list[str]:
    """Whether the first `samples` evaluation samples can rank nodes: a UsageError (exit 2) naming the
    fewest that can when a float output of theirs is near zero (mean square under 1 % of the whole
    set's: each trial's SQNR then divides rounding noise by almost nothing and ranks nothing), a warning
    below COARSE_SAMPLES (on digits_cnn the most sensitive node at 1, 2 and 4 samples was not the
    one all 301 samples name; at 8 it was, rank correlation 0.98, at 16 0.995), else []."""
    if samples is None:
        return []
    for name, power in setup.sample_power.items():
        if samples >= len(power) or not sum(power):
            continue
        whole = sum(power) / len(power)
        head = sum(power[:samples]) / samples
        if head < NEAR_ZERO * whole:
            enough = next(n for n in range(samples + 1, len(power) + 1) if sum(power[:n]) / n >= NEAR_ZERO * whole)
            raise UsageError(f"{option} {samples}: output {name} of the first {samples} evaluation sample(s) is near "
                             f"zero (mean square {head:.3g} against {whole:.3g} over all {len(power)}): an SQNR on "
                             f"it ranks rounding noise, not nodes; give {option} {enough} or more ("
                             f"{COARSE_SAMPLES} or more rank finely), or leave it out")
    total = max((len(power) for power in setup.sample_power.values()), default=setup.eval_data.total or samples)
    if samples < min(COARSE_SAMPLES, total):
        return [f"{option} {samples}: a ranking on fewer than {COARSE_SAMPLES} samples is coarse (on digits_cnn the "
                "most sensitive node at 1, 2 and 4 samples was not the one the whole evaluation set names)"]
    return []


def tune_objective(gates: dict[str, float], setup: TrialSetup, recipe: Recipe, model_path: Path) -> str:
    """The figure tune maximizes (search.promote.objective_name). A model whose outputs are all integer
    has only exact match to search by: without a min_exact_match gate its other gates would pass on
    nothing, so that is a RecipeError."""
    if setup.integer_only and "min_exact_match" not in gates:
        raise RecipeError(f"{recipe.source or 'recipe'}: validation.gates: every output of {model_path.name} is "
                          "integer (tags, class ids), which cosine, SQNR and top-1 gates do not score: tune "
                          "needs min_exact_match (the fraction of elements equal) as its target")
    return objective_name(gates, setup.integer_only)


def run_specs(executor: Executor, context: TrialContext, specs: list[TrialSpec], lost: list[dict] | None = None):
    """Each spec's TrialResult as it finishes; a trial the executor lost (its worker or node died
    after every retry) is left out and named in `lost` ({"trial", "reason"})."""
    for (_, spec), result in executor.map_unordered(run_trial, [(context, spec) for spec in specs]):
        if isinstance(result, LostTask):
            if lost is not None:
                lost.append({"trial": spec.key, "reason": result.reason})
            continue
        yield result


def executor_section(executor: Executor, lost: list[dict]) -> dict:
    """The report's account of where trials ran: kind, trials in flight, cluster, bytes shipped, lost trials."""
    remote = getattr(executor, "remote", False)
    return {"kind": "ray" if remote else "local", "jobs": executor.jobs,
            "address": getattr(executor, "address", None) if remote else None,
            "shipped_bytes": getattr(executor, "shipped_bytes", 0), "lost_trials": list(lost)}


# 2: a node quantized alone keeps its Q/DQ, and a trial that quantized nothing is unranked; version 1's
# rankings hold such nodes as error-free (SQNR inf) under placement fast, so they are measured again
CACHE_VERSION = 2


def read_cache(path: Path, key: str | None = None) -> dict | None:
    """The cache document at `path` (None when unreadable, of another CACHE_VERSION, or when `key` is
    given and differs)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("version") != CACHE_VERSION or (
            key is not None and document.get("key") != key):
        return None
    return document


# what cache_document writes begins with
CACHE_FILE = ("sensitivity cache qtool wrote", begins_like(rb'\{\s*"format":\s*"qtool-sensitivity"'))


def cache_document(key: str, mode: str, model_path: Path, rows: list[dict]) -> str:
    """The sensitivity cache file's text: the ranking under the key of everything it depends on."""
    return json.dumps(json_ready({"format": "qtool-sensitivity", "version": CACHE_VERSION, "key": key, "mode": mode,
                                  "model_sha256": file_sha256(model_path), "rows": rows}), indent=2) + "\n"


def measure_sensitivity(setup: TrialSetup, executor: Executor, mode: str, deadline: float | None, tick,
                 baseline: TrialResult, samples: int | None,
                 lost: list[dict] | None = None) -> tuple[list[dict], bool]:
    """The ranking rows, and whether every node was measured (a time budget can cut it short; a
    trial the executor lost is named in `lost` and its node's row says so)."""
    lost = [] if lost is None else lost
    if mode == "only_quantized":
        specs = [TrialSpec(f"only {node}", "sensitivity", only=node, samples=samples) for node in setup.quantizable]
    else:
        specs = [TrialSpec(f"float {node}", "sensitivity", keep_float=node, samples=samples)
                 for node in setup.quantizable]
    progress = tick("sensitivity")
    results = []
    spent = deadline is not None and time.monotonic() >= deadline  # then not even one trial is started
    for result in () if spent else run_specs(executor, setup.context, specs, lost):
        results.append(result)
        if progress:
            progress(len(results), len(specs))
        if deadline is not None and time.monotonic() >= deadline and len(results) < len(specs):
            break
    rows = rank_nodes(results, setup.op_types, mode, baseline)
    measured = {row["node"] for row in rows}
    lost_keys = {entry["trial"] for entry in lost}
    rows += [{"node": node, "op_type": setup.op_types[node], "rank": None,
              "note": "not measured (trial lost: its worker died)" if spec.key in lost_keys
              else BUDGET_CUT}
             for node, spec in zip(setup.quantizable, specs) if node not in measured]
    return rows, len(results) == len(specs)


RANKING_FIGURES = ("sqnr_db", "exact_match", "sqnr_gain_db", "exact_match_gain", "accuracy_drop")  # what ranks


def ranking_note(rows: list[dict]) -> str | None:
    """A warning when the ranking carries no information: two or more nodes measured and every one
    scores the same (an integer output no single node changes, or outputs no node's rounding moves).
    Their order is then only the node names' order, which tune would promote by; None otherwise.
    Read from the figures, not the ranks, so a cached ranking is judged the same way."""
    ranked = [row for row in rows if row.get("rank") is not None]
    scores = {tuple(repr(float(row[key])) for key in RANKING_FIGURES if key in row) for row in ranked}
    if len(ranked) < 2 or len(scores) > 1:
        return None
    figure = "exact_match" if "exact_match" in ranked[0] else "sqnr_db"
    shown = float(ranked[0].get(figure, "nan"))  # a cached row holds "inf"/"nan" as text
    return (f"the sensitivity ranking carries no information: all {len(ranked)} measured nodes score the same "
            f"({figure.replace('_', ' ')} {shown:.4g}); their order is only the node names'. Measure on more "
            "or harder validation samples (one node alone may change no tag on these), or rank by a float "
            "output (the logits before an ArgMax)")


def unranked_note(rows: list[dict]) -> str | None:
    """A warning naming the nodes the ranking could not measure because their trial quantized nothing
    (trial.QUANTIZED_NOTHING); None when there are none."""
    kept = [row["node"] for row in rows if row.get("note") == QUANTIZED_NOTHING]
    if not kept:
        return None
    named = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
    return (f"{len(kept)} of {len(rows)} nodes not ranked ({named}): their trial quantized nothing (its plan "
            "kept every node float), so it measured nothing about them; they come last")


BUDGET_CUT = "not measured (time budget)"  # the note of a sensitivity row the time budget left out


def budget_cut_note(rows: list[dict]) -> str | None:
    """A warning when the time budget stopped the ranking before every node was measured (the report's
    `complete: false` alone went unseen): the unmeasured nodes come last, so the search may never promote
    the node that matters; None otherwise."""
    cut = [row["node"] for row in rows if row.get("note") == BUDGET_CUT]
    if not cut:
        return None
    return (f"the time budget cut the sensitivity ranking short: {len(rows) - len(cut)} of {len(rows)} nodes "
            f"measured; the other {len(cut)} come last, unranked, and are promoted last if at all: give a longer "
            "--time-budget, or rank on fewer samples (--sensitivity-samples)")


def trial_row(result: TrialResult, objective_figure: str, float_bytes: int) -> dict:
    row = {
        "trial": result.spec.key, "kind": result.spec.kind,
        "promotions": [{"node": node, "step": step} for node, step in result.spec.promotions],
        "size_bytes": result.size_bytes, "size_ratio": float_bytes / result.size_bytes if result.size_bytes else None,
        "objective": objective(result, objective_figure), "sqnr_db": worst(result, "sqnr_db"),
        "cosine": worst(result, "cosine"), "quantized_nodes": result.quantized_nodes,
        "passed": result.passed, "seconds": result.seconds, "model_sha256": result.model_sha256,
    }
    if result.figure("exact_match") is not None:
        row["exact_match"] = result.figure("exact_match")
    if result.figure("slice_sqnr_db") is not None:  # what a min_slice_sqnr_db gate reads
        row["slice_sqnr_db"] = result.figure("slice_sqnr_db")
    if result.accuracy:
        row["accuracy"] = result.accuracy["candidate"]
        row["accuracy_drop"] = result.accuracy["reference"] - result.accuracy["candidate"]
    return row


def search_inputs(model_path: Path, recipe: Recipe, setup: TrialSetup) -> dict:
    return {
        "model": {"path": str(model_path), "sha256": file_sha256(model_path)},
        "recipe": {"path": str(recipe.source) if recipe.source else None, "resolved": recipe.as_dict()},
        "calibration_data": {"path": str(setup.calib_data.folder), "listing_sha256": setup.calib_data.listing_hash()},
        "validation_data": {"path": str(setup.eval_data.folder), "listing_sha256": setup.eval_data.listing_hash()},
    }


def json_ready(value):
    return json.loads(reporting.render_json(value))


