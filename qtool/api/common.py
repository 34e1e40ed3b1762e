"""What the use cases share: model preparation, the files a recipe reads, progress by stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from onnx import ModelProto

from qtool.errors import ModelError, SideFileError, UsageError
from qtool.io.data import model_inputs
from qtool.io.feeds import Loader
from qtool.io.model import load_model, upgrade_opset
from qtool.quantization.algorithms.equalization import EqualizedPair, equalize
from qtool.quantization.plan import required_opset
from qtool.quantization.prepare import prepare_model
from qtool.quantization.qdq import ensure_opset
from qtool.quantization.widen import widen_to_float32
from qtool.recipe.schema import Recipe
from qtool.reporting.files import write_ci_files
from qtool.runtime.session import check_runnable



# progress(stage, done, total): the CLI renders it; nothing below the CLI prints.
Progress = Callable[[str, int, int | None], None]
BENCH_THREADS = 1  # quantize and compare time on one intra-op thread unless told otherwise: the per-core ratio


def bench_threads(threads: int | None) -> int:
    """The intra-op thread count for the latency bench: BENCH_THREADS when None; more than this
    machine's logical CPUs (where the bench runs) raises UsageError (exit 2): `--threads 99999` made
    ONNX Runtime start a pool that never finished, deaf to SIGTERM."""
    if threads is None:
        return BENCH_THREADS
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:
        raise UsageError(f"--threads {threads}: the bench runs on this machine, which has {cpus} logical CPUs; "
                         f"allowed: 1 to {cpus}")
    return threads


def prepare(model_path: Path, recipe: Recipe | None = None) -> tuple[ModelProto, list[str]]:
    """load → opset upgrade → graph clean-up → the opset the recipe's types need → the recipe's
    equalization; returns the model and what was done."""
    model, notes, _ = prepare_with_pairs(model_path, recipe)
    return model, notes


def prepare_with_pairs(model_path: Path, recipe: Recipe | None) -> tuple[ModelProto, list[str], list[EqualizedPair]]:
    repairs: list[str] = []
    model = load_model(model_path, repairs=repairs)
    widened = widen_to_float32(model)  # first: ONNX Runtime's CPU kernels barely know bfloat16
    check_runnable(model, model_path)
    model, upgrade_note = upgrade_opset(model, model_path)
    model, notes = prepare_model(model)
    model, opset_note = ensure_opset(model, required_opset(recipe)) if recipe else (model, None)
    pairs: list[EqualizedPair] = []
    if recipe and recipe.quantization.algorithms.equalization:
        model, pairs = equalize(model)
    equalized = f"equalization: {len(pairs)} Conv pairs rescaled" if pairs else None
    return model, [note for note in [*repairs, widened, upgrade_note, *notes, opset_note, equalized] if note], pairs



def recipe_inputs(recipe: Recipe) -> tuple[Path | None, ...]:
    """The files a recipe reads: itself and its `base:` files, its validation data and labels, its
    tokenizer and initial state (none may be written over)."""
    data = recipe.data
    return (*recipe.files, recipe.resolve_path(recipe.validation.data), recipe.resolve_path(recipe.validation.labels),
            recipe.resolve_path(data.text.tokenizer) if data.text else None,
            recipe.resolve_path(data.state.initial) if data.state else None)



def data_inputs(model: ModelProto, model_path: Path):
    """The model's inputs; a model without any has nothing for data to feed."""
    inputs = model_inputs(model)
    if not inputs:
        raise ModelError(f"{model_path}: the model has no inputs (every value is computed inside it): "
                         "there is nothing for calibration data to feed")
    return inputs


def path_or_none(data) -> Path | None:
    """The file or folder `data` is read from (a --data-loader's .py file too), else None."""
    if isinstance(data, Loader):
        return data.path
    return Path(data) if isinstance(data, (str, Path)) else None


def stage_progress(progress: Progress | None):
    def for_stage(stage: str):
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)
    return for_stage



def write_ci_files_of(result, junit, step_summary, output: Path | None) -> None:
    """write_ci_files; a SideFileError carries `result`, whose gates and warnings the CLI still prints."""
    try:
        write_ci_files(result.report, junit, step_summary, output)
    except SideFileError as exc:
        raise SideFileError(str(exc), result) from None
