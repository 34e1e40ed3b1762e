"""The streaming calibration loop (batches → ONNX Runtime → observers → ranges) and its table file.

Only the tensors the plan will quantize are exposed, and each run's outputs are
dropped before the next, so memory does not grow with data. Nor does it grow with
`batch_size`: one ONNX Runtime run exposes at most MEMORY_BUDGET bytes of tensors
(see `calibrate`), whatever the recipe or the command line asks. With
`calibration.workers`, observers run in worker processes too (calibration/worker_pool.py).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from onnx import ModelProto

from qtool.calibration.hessians import HessianObserver, Im2Col
from qtool.calibration.worker_pool import ObserverPool, SharedOutputs, aligned, worker_count
from qtool.errors import CalibrationError, DataError
from qtool.io.data import DataFolder
from qtool.numerics import QType
from qtool.recipe.schema import CalibrationSpec
from qtool.runtime.session import make_session, run, with_outputs

Progress = Callable[[int, int | None], None]

TABLE_FORMAT = "qtool-calibration"
TABLE_VERSION = 1

# Bytes of exposed tensors one ONNX Runtime run may return. ORT holds every exposed tensor until
# the run ends, and hands each back as a numpy copy, so a run's peak is about twice this on top
# of the model. A batch is split into runs of as many samples as fit (at least one); where one
# sample alone is over it, the tensors are split into groups, each exposed in its own pass over
# the data (one session at a time). Measured on ppocr_det (320x320, 287 tensors, 142 MB per
# sample): peak RSS 1.36 GB for runs of 8 samples, 0.29 GB for runs of one. With worker processes
# the outputs go straight into a shared file instead (no copy), and runs get half the budget.
MEMORY_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class TensorRange:
    lo: float
    hi: float
    method: str
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationTable:
    ranges: dict[str, TensorRange]
    samples: int
    # Where a table read from a file came from: its path, model sha256, data listing, recipe.
    provenance: dict = field(default_factory=dict)
    # E[x xᵀ] of weight inputs, by node, for gptq rounding: [groups, d, d]; never written to the file.
    hessians: dict[str, np.ndarray] = field(default_factory=dict)


def calibrate(
    model: ModelProto,
    tensors: list[str],
    data: DataFolder,
    spec: CalibrationSpec,
    qtype: QType,
    symmetric: bool,
    progress: Progress | None = None,
    hessian_inputs: dict[str, tuple[str, Im2Col]] | None = None,
) -> CalibrationTable:
    """Observe every named tensor over the data folder; return one range each.

    `spec.overrides` choose another method (or percentile) per tensor: the first match wins.
    `hessian_inputs` (node -> its weight's input and geometry) adds E[x xᵀ] per node, in the same pass.
    """
    total = min(len(data.files), spec.samples) if spec.samples else len(data.files)
    specs = {name: spec.for_tensor(name) for name in tensors}
    moments = {node: (tensor, HessianObserver(geometry)) for node, (tensor, geometry) in (hessian_inputs or {}).items()}
    exposed = list(dict.fromkeys([*tensors, *(tensor for tensor, _ in moments.values())]))
    session = make_session(with_outputs(model, exposed), optimize=False)
    runs = _runs(data, spec.batch_size)
    first = next(runs, None)
    if first is None:
        raise DataError(f"{data.folder}: no samples to calibrate with")
    outputs = _run(partial(run, session), first, data)  # one sample, every tensor: their bytes per sample
    sizes = {name: float(outputs[name].nbytes) for name in exposed}
    histograms = sum(sizes[name] for name in tensors if specs[name].method != "minmax")
    workers = worker_count(spec.workers, histograms * total)
    budget = MEMORY_BUDGET // 2 if workers else MEMORY_BUDGET
    groups = _groups(exposed, sizes, budget)
    passes = len(groups)
    per_run = max(1, int(budget // max(sum(sizes.values()), 1.0))) if passes == 1 else 1
    capacity = max(sum(aligned(sizes[name] * per_run) for name in group) for group in groups)
    observed = {name: (specs[name], qtype, symmetric, total) for name in tensors}
    pinned = {tensor: sizes[tensor] for tensor, _ in moments.values()}  # Hessians are summed here
    shared = SharedOutputs(capacity) if workers else None
    try:
        with ObserverPool(observed, sizes, workers, pinned) as pool:
            if shared:
                outputs = shared.adopt(outputs, first[1])  # for the workers
            _observe(pool, moments, outputs, shared)
            del outputs
            if progress:
                progress(1, max(total, 1) * passes)
            for index, group in enumerate(groups):
                if passes > 1 or workers:  # a session per group, one at a time; or one that suits workers
                    session = None
                    session = make_session(with_outputs(model, group), optimize=False, pooled=bool(workers))
                if index:
                    runs = _runs(data, spec.batch_size)
                    next(runs)  # the first sample has been observed in every tensor
                if shared:
                    shared.use(session)
                execute = shared.run if shared else partial(run, session)
                done = 1
                for files, feeds in _split(runs, per_run):
                    outputs = _run(execute, (files, feeds), data)
                    _observe(pool, moments, outputs, shared)
                    done += _count(feeds)
                    del outputs, feeds  # nothing of this run survives into the next
                    if progress:  # with several passes: sample-passes, so the ETA holds
                        progress(index * max(total, done) + done, max(total, done) * passes)
            found = pool.results()
    finally:
        if shared:
            shared.close()
    del session
    ranges = {name: TensorRange(float(found[name][0].lo), float(found[name][0].hi), specs[name].method, found[name][1])
              for name in tensors}
    hessians = {node: h for node, (_, observer) in moments.items() if (h := observer.result()) is not None}
    return CalibrationTable(ranges, done, hessians=hessians)


def _observe(pool: ObserverPool, moments: dict, outputs: dict[str, np.ndarray], shared: SharedOutputs | None) -> None:
    pool.observe(outputs, shared)
    for tensor, observer in moments.values():
        if tensor in outputs:
            observer.update(outputs[tensor])


Run = tuple[tuple[str, ...], dict[str, np.ndarray]]  # (files, feeds) of one ONNX Runtime run


def _count(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0])


def _runs(data: DataFolder, batch_size: int) -> Iterator[Run]:
    """The data folder's batches, the first sample on its own (it measures the tensors' size)."""
    batches = data.batches(batch_size)
    for batch in batches:
        yield from _split(iter([(batch.files, batch.feeds)]), 1, first_only=True)
        break
    for batch in batches:
        yield batch.files, batch.feeds


def _split(runs: Iterator[Run], step: int, first_only: bool = False) -> Iterator[Run]:
    """Runs of at most `step` samples (the feeds are views, not copies); `first_only`: the first
    sample alone, then the rest unsplit."""
    for files, feeds in runs:
        count = _count(feeds)
        if count <= step:
            yield files, feeds
            continue
        starts = [0, 1, count] if first_only else [*range(0, count, step), count]
        for a, b in zip(starts[:-1], starts[1:]):
            yield files[a:b], {key: value[a:b] for key, value in feeds.items()}


def _groups(tensors: list[str], sizes: dict[str, float], budget: float) -> list[list[str]]:
    """Consecutive groups of tensors whose bytes per sample fit the budget (a tensor over it alone);
    one group when they all fit."""
    groups: list[list[str]] = [[]]
    used = 0.0
    for name in tensors:
        if groups[-1] and used + sizes[name] > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += sizes[name]
    return groups


def _run(execute: Callable[[dict], dict[str, np.ndarray]], run_: Run, data: DataFolder) -> dict[str, np.ndarray]:
    files, feeds = run_
    try:
        return execute(feeds)
    except Exception as exc:  # ORT reports bad feeds as assorted exception types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{data.folder / files[0]}: ONNX Runtime refused this input: {message}") from None


def _json_safe(value):
    """JSON has no inf/nan: write them as strings (as the report does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def table_document(table: CalibrationTable, *, model_path: Path, model_sha256: str, data: DataFolder,
                   recipe: dict, qtool_version: str) -> dict:
    """The calibration table file's content: ranges plus what they were measured on."""
    return _json_safe({
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "qtool_version": qtool_version,
        "model": {"path": str(model_path), "sha256": model_sha256},
        "data": {"path": str(data.folder), "listing_sha256": data.listing_hash()},
        "recipe": recipe,
        "samples": table.samples,
        "tensors": {
            name: {"lo": r.lo, "hi": r.hi, "method": r.method, "summary": r.summary}
            for name, r in sorted(table.ranges.items())
        },
    })


def save_table(document: dict, path: Path) -> None:
    """Write atomically: a temporary file beside `path`, renamed over it when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".qtool-tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, allow_nan=False)
            out.write("\n")
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _number(value, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{path}: {where}: expected a finite number, got {value!r}")
    return float(value)


def load_table(path: str | Path) -> CalibrationTable:
    """Read and check a table file written by `qtool calibrate`; any defect is a CalibrationError."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration table: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: not a calibration table (not valid JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
        raise CalibrationError(f"{path}: not a calibration table (expected \"format\": \"{TABLE_FORMAT}\"); "
                               "write one with `qtool calibrate`")
    if document.get("version") != TABLE_VERSION:
        raise CalibrationError(f"{path}: calibration table version {document.get('version')!r} is not "
                               f"supported (this qtool reads version {TABLE_VERSION})")
    tensors, model = document.get("tensors"), document.get("model")
    if not isinstance(tensors, dict) or not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
        raise CalibrationError(f"{path}: calibration table lacks its \"tensors\" or \"model.sha256\"")
    ranges = {}
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise CalibrationError(f"{path}: tensors.{name}: expected an object with lo, hi, method")
        lo = _number(entry.get("lo"), f"tensors.{name}.lo", path)
        hi = _number(entry.get("hi"), f"tensors.{name}.hi", path)
        if lo > hi:
            raise CalibrationError(f"{path}: tensors.{name}: lo {lo:g} is above hi {hi:g}")
        summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
        ranges[name] = TensorRange(lo, hi, str(entry.get("method", "")), summary)
    samples = document.get("samples")
    provenance = {key: document.get(key) for key in ("model", "data", "recipe", "qtool_version")}
    return CalibrationTable(ranges, samples if isinstance(samples, int) else 0, {"file": str(path), **provenance})


def check_table(table: CalibrationTable, model_sha256: str, needed: list[str]) -> None:
    """Refuse a table measured on another model file, or one without a range the plan needs."""
    source = table.provenance.get("file", "calibration table")
    recorded = (table.provenance.get("model") or {}).get("sha256")
    imported = table.provenance.get("format", TABLE_FORMAT) != TABLE_FORMAT  # other tools' files name no model
    if recorded != model_sha256 and not imported:
        raise CalibrationError(
            f"{source}: calibration table was made for another model (sha256 {str(recorded)[:12]}…, "
            f"this model {model_sha256[:12]}…); run `qtool calibrate` on this model"
        )
    missing = [name for name in needed if name not in table.ranges]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CalibrationError(
            f"{source}: calibration table has no range for {len(missing)} tensor(s) this plan quantizes "
            f"({shown}); was it made with another recipe? run `qtool calibrate` with this recipe"
        )
