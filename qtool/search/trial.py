"""Trials: a recipe plus per-node promotions, quantized from one shared calibration table and scored.

Every trial (sensitivity probe or search step) is a `TrialSpec` run by `run_trial`
in any process: it reads the prepared float models and the evaluation set (feeds,
float outputs, labels) from a work folder once per process, builds the recipe's
plan from the shared `CalibrationTable` (no recalibration), and measures the
quantized model against the float outputs. `rank_nodes` turns one-node trials
into the sensitivity ranking; `trial_latency` times a trial's model against the
float one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from onnx import ModelProto

from qtool.calibration.calibrate import CalibrationTable
from qtool.evaluation.compare import Comparison, OutputStats, check_gates
from qtool.evaluation.latency import BenchResult, bench_models
from qtool.evaluation.metrics import is_classifier_output, top1
from qtool.distributed.ray_executor import fetch
from qtool.io.external import content_sha256, scratch
from qtool.io.model import copy_metadata, load_model, proto_size
from qtool.io.samples import Batch
from qtool.io.streams import StreamState
from qtool.quantization.algorithms.bias_correction import LayerShift, requantize
from qtool.quantization.placement import plan_and_apply
from qtool.quantization.plan import required_opset, select_tensors
from qtool.recipe.schema import Recipe
from qtool.runtime.session import Provider, make_session, run, use_providers
from qtool.runtime.streams import StateCarry

A16 = {"uint8": "uint16", "int8": "int16"}  # the 16-bit step up from each 8-bit activation type
STEPS = ("a16", "float")  # precision steps above the recipe's own, in order
FLOAT_MODEL = "float.onnx"
EVAL_SET = "eval.npz"
EVAL_INDEX = "eval.json"
LATENCY_THREADS = 1  # one intra-op thread: a trial's ratio should not depend on what else the cores run
SEARCH_GATES = ("min_cosine", "min_sqnr_db", "max_accuracy_drop", "min_top1_agreement", "min_size_ratio",
                "min_slice_sqnr_db", "min_exact_match")


def exact_name(node: str) -> str:
    """The override regex that matches exactly one node name."""
    return f"^{re.escape(node)}$"


@dataclass(frozen=True)
class TrialSpec:
    """What one trial changes from the recipe.

    `promotions`: (node, step) pairs, step "a16" (16-bit activations) or "float".
    `only`: quantize this node alone (everything else float); `keep_float`: this node alone float.
    """

    key: str
    kind: str  # "baseline", "sensitivity" or "search"
    promotions: tuple[tuple[str, str], ...] = ()
    only: str | None = None
    keep_float: str | None = None
    samples: int | None = None  # measure on the first N evaluation samples only (None: all)


def promotion_overrides(promotions, activation_dtype: str) -> list[dict]:
    """Recipe `quantization.overrides` entries for promotions: exact-name matches, one per node."""
    entries = []
    for node, step in promotions:
        if step == "float":
            entries.append({"match": {"name": exact_name(node)}, "float": True})
        else:
            entries.append({"match": {"name": exact_name(node)},
                            "activations": {"dtype": A16.get(activation_dtype, activation_dtype)}})
    return entries


def trial_overrides(spec: TrialSpec, recipe: Recipe) -> list[dict]:
    if spec.only is not None:
        # Name matches rank first and the earlier wins: this node stays quantized, every other goes float.
        return [{"match": {"name": exact_name(spec.only)}, "float": False}, {"match": {"name": ".*"}, "float": True}]
    if spec.keep_float is not None:
        return [{"match": {"name": exact_name(spec.keep_float)}, "float": True}]
    return promotion_overrides(spec.promotions, recipe.quantization.activations.dtype)


def with_overrides(recipe: Recipe, overrides: list[dict]) -> Recipe:
    """The recipe with `overrides` placed before its own (so they win within their rank)."""
    if not overrides:
        return recipe
    document = recipe.as_dict()
    document["quantization"]["overrides"] = overrides + document["quantization"]["overrides"]
    return Recipe.model_validate({**document, "source": recipe.source})


def trial_recipe(recipe: Recipe, spec: TrialSpec) -> Recipe:
    """The recipe one trial quantizes with. A node quantized alone keeps every Q/DQ it plans (`placement:
    all`): it measures that node's own error, where `fast` or `fused` would judge a lone node's speed
    (conversions on both sides of one kernel) and keep it float, its error unmeasured."""
    recipe = with_overrides(recipe, trial_overrides(spec, recipe))
    if spec.only is None:
        return recipe
    return recipe.with_placement("all")


def float_model_name(recipe: Recipe) -> str:
    """Which prepared float model a recipe runs on: its opset follows the types it uses."""
    need = required_opset(recipe)
    return FLOAT_MODEL if need is None else f"float-opset{need[0]}.onnx"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its spec; small and picklable (the models stay on disk)."""

    folder: str  # work folder: float model(s), eval.npz, eval.json
    recipe: Recipe
    table: CalibrationTable
    saturating_host: bool
    gates: dict[str, float]
    float_bytes: int
    threads: int | None = None  # ORT intra-op threads per trial (1 when trials run in parallel)
    # the execution providers of the command (--provider): worker processes do not inherit the parent's
    providers: tuple[Provider, ...] = ()
    # The work folder's files for workers on other machines: {file name: bytes}, or a reference to
    # them in Ray's object store (`ship_folder`); None: `folder` is readable where trials run.
    bundle: object = None
    mask_input: str | None = None  # text data's attention mask: padding is left out of exact match
    # bias correction as the search setup measured and kept it (qtool.evaluation.bias_choice): every
    # trial corrects the layers it quantizes with these shifts (the recipe's weights, then those of
    # 16-bit activation promotions where they differ), as `qtool quantize` with `bias_correction: true`
    # does; None: trials do not correct
    bias_shifts: tuple[dict[str, LayerShift], ...] | None = None


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    outputs: dict[str, dict]  # output name -> cosine, sqnr_db, ...
    accuracy: dict[str, float]  # "reference"/"candidate" -> top-1, with labels
    labelled: int
    samples: int
    size_bytes: int
    quantized_nodes: int
    seconds: float
    notes: tuple[str, ...] = ()
    gates: tuple = ()  # GateResult per search gate, filled by `run_trial`
    model_sha256: str = ""

    @property
    def comparison(self) -> Comparison:
        return Comparison(self.samples, self.outputs, self.accuracy, self.labelled)

    @property
    def passed(self) -> bool:
        """Every search gate passes, on a model that is quantized at all: a trial that promoted (or
        placed) every node to float is the float model, which `qtool quantize` refuses to write."""
        return self.quantized_nodes > 0 and all(gate.passed for gate in self.gates)

    def figure(self, name: str) -> float | None:
        return self.comparison.figure(name)


@dataclass
class _State:
    models: dict[str, ModelProto] = field(default_factory=dict)
    batches: list[dict] = field(default_factory=list)  # {"feeds", "reference", "labels"}


_STATES: dict[str, _State] = {}  # per process: work folder -> loaded state
_COPIES: dict[str, tempfile.TemporaryDirectory] = {}  # per process: work folder -> its local copy


def folder_files(folder: Path) -> dict[str, bytes]:
    """The work folder's files (prepared float models, their external data, the evaluation set), by name:
    what a trial on another machine needs, shipped once through the executor's object store (not the
    weights' work files qtool.io.external keeps beside them)."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())
            if path.is_file() and path.name.startswith(("float", "eval."))}


def _folder(context: TrialContext) -> Path:
    """Where this process reads the work folder: the folder itself, or a local copy of its bundle."""
    if context.bundle is None:
        return Path(context.folder)
    copy = _COPIES.get(context.folder)
    if copy is None:
        for old in _COPIES.values():  # one work folder at a time per process
            old.cleanup()
        _COPIES.clear()
        copy = _COPIES[context.folder] = tempfile.TemporaryDirectory(prefix="qtool-trial-")
        for name, data in fetch(context.bundle).items():
            (Path(copy.name) / name).write_bytes(data)
    return Path(copy.name)


def write_eval_set(folder: Path, batches: list[tuple[dict, dict, list[int], bool | None]],
                   carry: dict[str, str] | None = None) -> None:
    """Feeds, float outputs, labels (-1: none) and whether it begins a stream per batch, as one .npz (no
    pickle) plus an index; `carry`: a stateful model's state input -> output (qtool.io.streams)."""
    arrays, index = {}, []
    for b, (feeds, reference, labels, start) in enumerate(batches):
        entry = {"feeds": list(feeds), "reference": list(reference), "start": start, "carry": carry}
        for kind, values in (("feeds", feeds), ("reference", reference)):
            for i, value in enumerate(values.values()):
                arrays[f"{kind}_{b}_{i}"] = value
        arrays[f"labels_{b}"] = np.asarray(labels, dtype=np.int64)
        index.append(entry)
    np.savez(folder / EVAL_SET, **arrays)
    (folder / EVAL_INDEX).write_text(json.dumps(index), encoding="utf-8")


def _state(context: TrialContext) -> _State:
    state = _STATES.get(context.folder)
    if state is None:
        folder = _folder(context)
        state = _State()
        index = json.loads((folder / EVAL_INDEX).read_text(encoding="utf-8"))
        with np.load(folder / EVAL_SET, allow_pickle=False) as arrays:
            for b, entry in enumerate(index):
                state.batches.append({
                    kind: {name: arrays[f"{kind}_{b}_{i}"] for i, name in enumerate(entry[kind])}
                    for kind in ("feeds", "reference")
                } | {"labels": arrays[f"labels_{b}"], "start": entry.get("start"), "carry": entry.get("carry")})
        _STATES.clear()  # one work folder at a time per process
        _STATES[context.folder] = state
    return state


def _float_model(context: TrialContext, recipe: Recipe) -> ModelProto:
    state = _state(context)
    name = float_model_name(recipe)
    if name not in state.models:
        state.models[name] = load_model(_folder(context) / name)
    return state.models[name]


def build_trial_model(context: TrialContext, spec: TrialSpec) -> tuple[ModelProto, int, list[str]]:
    """The quantized model of one trial from the shared table (what `qtool quantize` builds from
    the same recipe), the number of nodes quantized, and notes."""
    recipe = trial_recipe(context.recipe, spec)
    model = _float_model(context, recipe)
    selection = select_tensors(model, recipe)
    missing = [name for name in selection.calibration_tensors if name not in context.table.ranges]
    notes = [f"{len(missing)} tensor(s) without a calibrated range in the shared table, kept float"] if missing else []
    placed = plan_and_apply(model, recipe, selection, context.table, context.saturating_host)
    plan, quantized = placed.plan, placed.model
    if context.bias_shifts is not None:
        plan, quantized, _ = requantize(model, recipe, context.table, context.saturating_host, plan, quantized,
                                        context.bias_shifts)
    copy_metadata(model, quantized)  # as `qtool quantize` does
    return quantized, sum(1 for d in plan.nodes if d.quantized), notes


def run_trial(task: tuple[TrialContext, TrialSpec]) -> TrialResult:
    """Build one trial's model and measure it against the float outputs (module-level: runs in workers).
    The files the trial's model needs on disk (past 2 GB) go into the work folder and are removed
    when it is measured."""
    context, spec = task
    with scratch(_folder(context)):
        return _run_trial(context, spec)


def _run_trial(context: TrialContext, spec: TrialSpec) -> TrialResult:
    started = time.perf_counter()
    quantized, quantized_nodes, notes = build_trial_model(context, spec)
    with use_providers(context.providers):
        session = make_session(quantized, threads=context.threads)
    stats: dict[str, OutputStats] = {}
    correct = {"reference": 0, "candidate": 0}
    labelled = samples = 0
    batches = _state(context).batches
    carry = StateCarry(StreamState(batches[0]["carry"], {}) if batches and batches[0]["carry"] else None)
    for batch in batches:
        if spec.samples is not None:
            if samples >= spec.samples:
                break
            batch = _head(batch, spec.samples - samples)
        start = (batch["start"],) if batch["start"] is not None else None
        outputs = carry.run(partial(run, session), Batch((), batch["feeds"], None, start))
        feeds = batch["feeds"]
        mask = (context.mask_input, feeds[context.mask_input]) if context.mask_input in feeds else None
        for name, reference in batch["reference"].items():
            stats.setdefault(name, OutputStats()).update(reference, outputs[name], mask)
        samples += next(iter(batch["feeds"].values())).shape[0]
        known = batch["labels"] >= 0
        first = next(iter(batch["reference"]))
        if known.any() and is_classifier_output(batch["reference"][first]):
            truth = batch["labels"][known]
            correct["reference"] += int(np.sum(top1(batch["reference"][first])[known] == truth))
            correct["candidate"] += int(np.sum(top1(outputs[first])[known] == truth))
            labelled += int(known.sum())
    figures = {name: s.figures(histogram=False) for name, s in stats.items()}
    accuracy = {key: value / labelled for key, value in correct.items()} if labelled else {}
    size = proto_size(quantized)
    gates = {name: value for name, value in context.gates.items() if name in SEARCH_GATES}
    verdicts = check_gates(Comparison(samples, figures, accuracy, labelled), gates,
                           {"size_ratio": context.float_bytes / size if size else None})
    digest = content_sha256(quantized)  # what `qtool quantize` must reproduce, wherever the weights are
    return TrialResult(spec, figures, accuracy, labelled, samples, size, quantized_nodes,
                       time.perf_counter() - started, tuple(notes), tuple(verdicts), digest)


def trial_latency(context: TrialContext, spec: TrialSpec, rounds: int, **bench) -> BenchResult:
    """One trial's model against the recipe's prepared float model on the first evaluation sample,
    interleaved (`bench_models`, one ORT thread, `bench` its other keywords: max_seconds, min_rounds,
    tolerance); meant for the parent with no trial running beside it."""
    with scratch():
        quantized, _, _ = build_trial_model(context, spec)
        feeds = _head(_state(context).batches[0], 1)["feeds"]
        with use_providers(context.providers):
            return bench_models(_float_model(context, context.recipe), quantized, feeds, threads=LATENCY_THREADS,
                                rounds=rounds, **bench)


def _head(batch: dict, count: int) -> dict:
    """The first `count` samples of a batch."""
    return {"feeds": {k: v[:count] for k, v in batch["feeds"].items()},
            "reference": {k: v[:count] for k, v in batch["reference"].items()}, "labels": batch["labels"][:count],
            "start": batch.get("start"), "carry": batch.get("carry")}


# --- sensitivity ranking ------------------------------------------------------------------------


def worst(result: TrialResult, name: str) -> float:
    value = result.figure(name)
    return float("nan") if value is None else float(value)


def ranking_figure(result: TrialResult) -> str:
    """What ranks nodes: the worst output SQNR, or, where every output is integer (tags, class ids: no
    SQNR), the worst exact match."""
    return "exact_match" if result.figure("sqnr_db") is None and result.figure("exact_match") is not None \
        else "sqnr_db"


# the note of a sensitivity row whose trial quantized nothing: what the node's precision does is unknown
QUANTIZED_NOTHING = ("not measured: its trial quantized nothing (its plan kept every node float: no usable range, "
                     "or, with this node float, placement fast found no integer kernel that pays)")


def rank_nodes(results: list[TrialResult], op_types: dict[str, str], mode: str,
               baseline: TrialResult | None = None) -> list[dict]:
    """Rows, most sensitive first.

    mode "only_quantized": the error with the node quantized alone (lowest SQNR first);
    mode "only_float": the SQNR gained over the full recipe by keeping the node float
    (largest gain first). A model whose outputs are all integer ranks by exact match instead
    (`exact_match`, `exact_match_gain`). A trial that quantized nothing measured neither: its node
    comes last, unranked (QUANTIZED_NOTHING), never as error-free or as the one float node that
    gains most. Nodes that score the same share a rank (1, 1, 3: ties are
    not ordered by anything the measurement said; `ranking_note` names a ranking that is all ties).
    """
    figure = ranking_figure(baseline or results[0]) if results or baseline else "sqnr_db"
    gain_key = "sqnr_gain_db" if figure == "sqnr_db" else "exact_match_gain"
    rows = []
    def node_of(result: TrialResult) -> str:
        return result.spec.only if mode == "only_quantized" else result.spec.keep_float

    unranked = [result for result in results if not result.quantized_nodes]
    for result in (result for result in results if result.quantized_nodes):
        node = node_of(result)
        row = {"node": node, "op_type": op_types.get(node, ""), "sqnr_db": worst(result, "sqnr_db"),
               "cosine": worst(result, "cosine"), "size_bytes": result.size_bytes}
        if figure == "exact_match":
            row["exact_match"] = worst(result, "exact_match")
        drop = result.figure("accuracy_drop")
        if drop is not None:
            row["accuracy_drop"] = drop
        if mode == "only_float" and baseline is not None:
            row[gain_key] = row[figure] - worst(baseline, figure)
        rows.append(row)

    def severity(row: dict) -> tuple:
        if mode == "only_float":
            gain = row.get(gain_key, 0.0)
            return (-(gain if math.isfinite(gain) else 1e9),)
        value = row[figure]
        return (value if not math.isnan(value) else math.inf, -row.get("accuracy_drop", 0.0))

    rows.sort(key=lambda row: (*severity(row), row["node"]))
    for place, row in enumerate(rows, 1):
        row["rank"] = rows[place - 2]["rank"] if place > 1 and severity(rows[place - 2]) == severity(row) else place
    return rows + sorted(({"node": node_of(result), "op_type": op_types.get(node_of(result), ""), "rank": None,
                           "note": QUANTIZED_NOTHING} for result in unranked), key=lambda row: row["node"])


def cache_key(model_sha256: str, recipe: Recipe, listings: list[str], mode: str,
              providers: tuple[Provider, ...]) -> str:
    """What a cached ranking depends on: model bytes, the recipe's calibration, data and quantization
    sections and validation.samples (not its gates), the data listings, the mode and the execution
    providers (their kernels round differently)."""
    resolved = recipe.as_dict()
    relevant = {key: resolved[key] for key in ("calibration", "data", "quantization")}
    relevant["validation.samples"] = resolved["validation"]["samples"]
    digest = hashlib.sha256()
    for part in (model_sha256, json.dumps(relevant, sort_keys=True), *listings, mode, json.dumps(providers)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()
