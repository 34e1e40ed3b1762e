"""How tune times its trials and says how far the timings can be trusted: the report's latency section, the
finalists' second timing, the max_latency_ratio verdict and the noise warnings."""

from __future__ import annotations

import time

from qtool.evaluation.latency import MIN_ROUNDS, TOLERANCE, BenchResult, noise_warning
from qtool.evaluation.latency import latency_section as bench_section
from qtool.evaluation.validation import slower_warning
from qtool.runtime.session import current_providers
from qtool.search.promote import Search
from qtool.search.trial import LATENCY_THREADS, TrialContext, TrialResult, trial_latency


def latency_gate(limit: float | None, timing: BenchResult | None) -> dict | None:
    """max_latency_ratio on the chosen trial: not a search gate (the search minimises latency), a verdict."""
    if limit is None:
        return None
    value = timing.ratio if timing is not None else None
    return {"name": "max_latency_ratio", "threshold": limit, "value": value,
            "passed": value is not None and value <= limit}


def time_trials(context: TrialContext, trials: list[TrialResult], runs: int, latencies: dict, progress,
                deadline: float | None = None, chosen: TrialResult | None = None) -> None:
    """Time the trials the search did not (those that failed the gates), for the report. Past `deadline`
    (a time.monotonic() value) only `chosen` is: the others' rows are left untimed."""
    for done, result in enumerate(trials, 1):
        spent = deadline is not None and time.monotonic() >= deadline
        if result.spec.promotions not in latencies and (not spent or result is chosen):
            latencies[result.spec.promotions] = trial_latency(context, result.spec, runs)
        if progress:
            progress(done, len(trials))


def latency_section(runs: int, final: bool, interrupted: bool) -> dict:
    status = "off" if not runs else "pending" if not final else "interrupted" if interrupted else "measured"
    return {"status": status, "runs": runs, "threads": LATENCY_THREADS, "batch_size": 1,
            "provider": current_providers()[0][0],
            "method": ("Trials that pass the gates are timed as their batch of trials ends (the search "
                       "picks the fastest of them), the others after the search; one trial at a time in the "
                       "tuning process (no trial running beside it): every trial against the prepared float model "
                       "on the first evaluation sample, in interleaved A/B rounds (order alternating) after "
                       f"warm-up, at least {MIN_ROUNDS} rounds, then until the ratio's 95 % interval is within "
                       f"±{TOLERANCE:.0%} or 4 s pass (at most {runs} rounds), {LATENCY_THREADS} ONNX Runtime "
                       f"intra-op thread, {current_providers()[0][0]}; ratio = the median of per-round quantized / "
                       "float ratios (below 1: faster). The fastest passing trial and those whose interval "
                       "overlaps it (the finalists) are then timed again, longer, and the choice made on "
                       "that second timing.")}


def confirmed_trials(search: Search, confirmed: dict[tuple, BenchResult]) -> list[TrialResult]:
    """The trials `Search.confirm` timed twice, fastest first by their second timing."""
    return sorted((r for r in search.order if r.spec.promotions in confirmed),
                  key=lambda r: search.latency[r.spec.promotions].median)


def latency_verdict(search: Search, latencies: dict[tuple, BenchResult], confirmed: dict[tuple, BenchResult]) -> dict:
    """The finalists' two timings, and whether the second could rank the chosen trial above the runner-up."""
    finalists = confirmed_trials(search, confirmed)
    rows = [{"trial": r.spec.key, "first_ratio": confirmed[r.spec.promotions].ratio,
             "ratio": latencies[r.spec.promotions].ratio,
             "interval": [latencies[r.spec.promotions].estimate.low, latencies[r.spec.promotions].estimate.high],
             "tight": latencies[r.spec.promotions].tight} for r in finalists]
    if not finalists:
        verdict = "no trial that passes the gates was timed"
    elif len(finalists) == 1:
        verdict = "one finalist: no other passing trial's interval overlapped the fastest's"
    else:
        best, runner = rows[0], rows[1]
        verdict = (f"ranked: {best['trial']} is faster than {runner['trial']} beyond noise"
                   if best["interval"][1] < runner["interval"][0] else
                   f"too noisy to rank: {best['trial']} and {runner['trial']} have overlapping intervals; "
                   "the smaller model is chosen among ties")
    return {"finalists": rows, "verdict": verdict}


def latency_warnings(search: Search, latencies: dict[tuple, BenchResult], confirmed: dict[tuple, BenchResult]) -> list[str]:
    """Warnings when the chosen trial is slower than float, when its timing stayed noisy, or when it could
    not be told from the runner-up's."""
    best = search.best
    timing = latencies.get(best.spec.promotions) if best is not None and best.passed else None
    if timing is None:
        return []
    warnings = slower_warning(bench_section(timing), "the chosen trial")
    warnings += noise_warning(timing, "the chosen trial's latency ratio")
    verdict = latency_verdict(search, latencies, confirmed)["verdict"]
    if verdict.startswith("too noisy"):
        warnings.append(f"latency {verdict}")
    return warnings
