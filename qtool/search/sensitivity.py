"""`qtool sensitivity`: rank the nodes a recipe quantizes by the output error each one causes.

One calibration and one float run set up every trial (search/setup.py); trials run through an
executor (the scale-out seam); the ranking is cached as JSON and reused by `tune`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from qtool.api import Progress, recipe_inputs, stage_progress
from qtool.errors import SideFileError, UsageError, WriteError
from qtool.io.artifacts import temporary_folder, write_artifacts, write_text_atomic
from qtool.distributed.ray_executor import refuse_past_limit
from qtool.io.external import scratch
from qtool.io.targets import check_output_file, check_output_path
from qtool.io.model import file_sha256
from qtool.recipe.load import load_recipe
from qtool.recipe.schema import Recipe
from qtool.reporting import document as reporting
from qtool.reporting.search import search_report_writers
from qtool.search.executor import make_executor
from qtool.search.promote import objective_name
from qtool.search.setup import (CACHE_FILE, algorithms_the_trials_skip, cache_document, check_ranking_samples,
                                executor_section, measure_sensitivity, ranking_note, read_cache, search_inputs,
                                setup_trials, trial_row, unranked_note)
from qtool.search.trial import TrialSpec, cache_key, folder_files, run_trial

SENSITIVITY_CACHE = "sensitivity.cache.json"
SENSITIVITY_MODES = ("only_quantized", "only_float")


@dataclass(frozen=True)
class SensitivityResult:
    report: dict
    rows: list[dict]
    cache_hit: bool
    alerts: tuple[str, ...] = ()  # the report's warnings about the ranking itself, for stderr


def sensitivity(
    model_path: str | Path,
    data_dir: str | Path,
    recipe: Recipe | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    validation_data: str | Path | None = None,
    labels: str | Path | None = None,
    mode: str = "only_quantized",
    samples: int | None = None,
    jobs: int | None = None,
    cache: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> SensitivityResult:
    """Rank the nodes `recipe` quantizes by the output error each one causes.

    mode "only_quantized": each node quantized alone, every other node float;
    "only_float": each node kept float alone. One calibration serves every trial; `samples`
    limits each trial to the first N evaluation samples (faster, coarser).
    The ranking is cached as JSON (`cache`, default OUTPUT_DIR/sensitivity.cache.json)
    under a key of the model's sha256, the recipe and the data listings: a re-run
    with the same inputs reads it instead of measuring again.
    `executor` "local": `jobs` processes here (default 1); "ray": Ray tasks on the cluster at
    `ray_address` (default RAY_ADDRESS, else a local instance), `jobs` at a time (default its CPUs);
    a trial Ray loses is named in the report and its node left unranked.
    """
    if mode not in SENSITIVITY_MODES:
        raise UsageError(f"unknown sensitivity mode {mode!r}; allowed: {', '.join(SENSITIVITY_MODES)}")
    model_path, data_dir = Path(model_path), Path(data_dir)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_samples(recipe, samples, "--samples")
    output = Path(output_dir) if output_dir is not None else None
    inputs = (data_dir, validation_data, labels, *recipe_inputs(recipe))
    if output is not None:
        check_output_path(output, model_path, overwrite, inputs)
    cache_path = Path(cache) if cache is not None else (output / SENSITIVITY_CACHE if output is not None else None)
    if cache is not None:
        check_output_file(cache_path, model_path, inputs, what="--cache file", overwrite=overwrite, ours=CACHE_FILE)
    refuse_past_limit(model_path, executor)
    tick = stage_progress(progress)
    started = time.perf_counter()
    lost: list[dict] = []
    # the trials' folder is also the work folder (qtool.io.external): the float model's data is not copied
    # again for its sessions, and a worker killed mid-trial leaves its files there, removed with it
    with temporary_folder("qtool-trials-") as folder, scratch(folder), \
            make_executor(jobs, executor, ray_address) as pool:
        setup = setup_trials(model_path, data_dir, recipe, folder, validation_data, labels,
                              1 if pool.jobs > 1 or pool.remote else None, tick)
        alerts = algorithms_the_trials_skip(recipe) + check_ranking_samples(setup, samples, "--samples")
        key = cache_key(file_sha256(model_path), recipe,
                        [setup.calib_data.listing_hash(), setup.eval_data.listing_hash()], f"{mode}:{samples}",
                        setup.context.providers)
        cached = read_cache(cache_path, key) if cache_path is not None else None
        baseline = run_trial((setup.context, TrialSpec("recipe as given", "baseline", samples=samples)))
        if cached is not None:
            rows, complete = cached["rows"], True
        else:
            if pool.remote:  # the work folder travels once through the object store, not as a path
                setup.context = replace(setup.context, bundle=pool.put(folder_files(folder)))
            rows, complete = measure_sensitivity(setup, pool, mode, None, tick, baseline, samples, lost)
        where = executor_section(pool, lost)
    cache_text = cache_document(key, mode, model_path, rows)
    tie, unranked = ranking_note(rows), unranked_note(rows)
    alerts += [note for note in (tie, unranked) if note]
    report = {
        "schema_version": reporting.REPORT_SCHEMA_VERSION, "command": "sensitivity", "passed": True,
        "versions": reporting.versions(), "execution_providers": reporting.execution_providers(),
        "inputs": search_inputs(model_path, recipe, setup),
        "prepare": setup.prepare_notes, "warnings": setup.warnings + alerts,
        "sensitivity": {
            "mode": mode, "rows": rows, "complete": complete, "informative": tie is None,
            "cache": {"path": str(cache_path) if cache_path else None, "key": key, "hit": cached is not None},
            "unnamed_nodes": setup.unnamed,
            "calibration_s": setup.calibration_s, "wall_s": time.perf_counter() - started,
            "executor": where,
        },
        "baseline": trial_row(baseline, objective_name({}, setup.integer_only), setup.context.float_bytes),
    }
    if output is not None:
        writers = {**search_report_writers(report)}
        if cache_path is not None and cache_path.parent.resolve() == output.resolve():
            writers[cache_path.name] = lambda path: path.write_text(cache_text, encoding="utf-8")
        write_artifacts(output, overwrite, writers)
    if cache_path is not None and cache_path.parent.resolve() != (output.resolve() if output else None):
        try:
            write_text_atomic(cache_path, cache_text)
        except WriteError as exc:
            if output is None:
                raise
            raise SideFileError(f"{exc} (the artifacts in {output} are complete)") from None
    return SensitivityResult(report, rows, cached is not None, tuple(alerts))


def check_samples(recipe: Recipe, samples: int | None, option: str) -> None:
    """A stateful model's evaluation runs as whole streams: the first N samples would cut a stream
    short of the state its float reference was measured with."""
    if samples is not None and recipe.data.state is not None:
        raise UsageError(f"{option} cannot cut a stateful model's streams (data.state): leave it out, or "
                         "give fewer or shorter validation files")
