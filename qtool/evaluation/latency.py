"""Interleaved A/B latency of two models in one process on ONNX Runtime (the run's execution providers).

Rounds alternate the order (AB, BA, ...) so drift in clocks, caches and
neighbours lands on both models alike. The figure is the median of the
per-round ratios (candidate time / reference time of the same round), with a
distribution-free 95 % confidence interval of that median; rounds go on past
a minimum until the interval is tight or the time bound passes, and the
result says whether it got tight (`BenchResult.tight`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import ModelProto

from qtool.runtime.session import make_session

MIN_ROUNDS = 20  # rounds always run, however slow the model or busy the machine
TOLERANCE = 0.03  # the interval's half-width, relative to the ratio, that counts as tight
CHECK_EVERY = 5  # rounds between two looks at the interval (each look sorts the ratios)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "runs": self.runs}


@dataclass(frozen=True)
class RatioEstimate:
    """The median of per-round ratios and its 95 % confidence interval (order statistics of the sorted
    ratios at n/2 ± 1.96·√n/2: no assumption about the distribution of the noise)."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """The interval's half-width relative to the median (0.03: the ratio is known to ±3 %)."""
        return (self.high - self.low) / 2 / self.median if self.median > 0 else math.inf


def ratio_estimate(ratios: list[float] | np.ndarray) -> RatioEstimate:
    """The RatioEstimate of per-round ratios (at least one)."""
    values = np.sort(np.asarray(ratios, dtype=float))
    n = len(values)
    half = 1.96 * math.sqrt(n) / 2
    low = min(n - 1, max(0, math.floor(n / 2 - half)))
    high = min(n - 1, max(0, math.ceil(n / 2 + half) - 1))
    return RatioEstimate(float(np.median(values)), float(values[low]), float(values[high]), n)


@dataclass(frozen=True)
class BenchResult:
    reference: Latency
    candidate: Latency
    threads: int | None
    warmup: int
    batch_size: int
    provider: str  # the execution provider the quantized model's session runs on first
    estimate: RatioEstimate
    tolerance: float = TOLERANCE

    @property
    def ratio(self) -> float:
        """Candidate over reference, the median of per-round ratios: below 1 the candidate is faster."""
        return self.estimate.median

    @property
    def tight(self) -> bool:
        """The ratio's confidence interval is within `tolerance` of it: the machine was quiet enough."""
        return self.estimate.spread <= self.tolerance


def _summary(times: list[float]) -> Latency:
    ms = np.asarray(times) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return Latency(float(median), float(p10), float(p90), len(times))


def interleave(run_reference: Callable[[], object], run_candidate: Callable[[], object], *,
               min_rounds: int = MIN_ROUNDS, max_rounds: int = 200, max_seconds: float = 4.0,
               tolerance: float = TOLERANCE,
               clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds per call of each runner, one call of each per round, order alternating (AB, BA, ...).

    Stops at `max_rounds`; after `min_rounds`, also when the per-round ratio's interval is within
    `tolerance` (looked at every CHECK_EVERY rounds) or `max_seconds` have passed. `clock` is
    injectable so that the stopping rule is tested without timing anything.
    """
    runners = (run_reference, run_candidate)
    times: tuple[list[float], list[float]] = ([], [])
    start = clock()
    for i in range(max(max_rounds, min_rounds)):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            began = clock()
            runners[which]()
            times[which].append(clock() - began)
        done = i + 1
        if done < min_rounds:
            continue
        if clock() - start > max_seconds:
            break
        if done % CHECK_EVERY == 0 and _ratio_of(times).spread <= tolerance:
            break
    return times


def _ratio_of(times: tuple[list[float], list[float]]) -> RatioEstimate:
    reference, candidate = np.asarray(times[0]), np.asarray(times[1])
    return ratio_estimate(candidate / np.maximum(reference, 1e-12))


def bench_models(
    reference: ModelProto,
    candidate: ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 200,
    max_seconds: float = 4.0,
    min_rounds: int = MIN_ROUNDS,
    tolerance: float = TOLERANCE,
) -> BenchResult:
    """Time both models on the same feeds, interleaved (`interleave`): at least `min_rounds`, then
    until the ratio is known within `tolerance`, `max_seconds` pass or `rounds` are run."""
    sessions = [make_session(reference, threads=threads), make_session(candidate, threads=threads)]
    names = [[output.name for output in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for session, outputs in zip(sessions, names):
            session.run(outputs, feeds)
    times = interleave(lambda: sessions[0].run(names[0], feeds), lambda: sessions[1].run(names[1], feeds),
                       min_rounds=min(min_rounds, rounds), max_rounds=rounds, max_seconds=max_seconds,
                       tolerance=tolerance)
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    return BenchResult(_summary(times[0]), _summary(times[1]), threads, warmup, batch,
                       sessions[1].get_providers()[0], _ratio_of(times), tolerance)


def latency_section(bench: BenchResult) -> dict:
    """The report's latency section (qtool/reporting/schemas/report.schema.json): both models' figures and how they were taken."""
    return {
        "reference": bench.reference.as_dict(),
        "candidate": bench.candidate.as_dict(),
        "ratio": bench.ratio,
        "ratio_interval": [bench.estimate.low, bench.estimate.high],
        "tight": bench.tight,
        "threads": bench.threads,
        "warmup": bench.warmup,
        "batch_size": bench.batch_size,
        "provider": bench.provider,
        "method": ("interleaved A/B in one process, order alternating each round; ratio = median of per-round "
                   f"ratios with its 95 % interval (order statistics); at least {MIN_ROUNDS} rounds, then "
                   f"until the interval is within ±{bench.tolerance:.0%} or the time bound passes"),
    }


def noise_warning(bench: BenchResult, what: str = "the latency ratio") -> list[str]:
    """A warning when the timing never got tight: the machine was too busy to trust small differences."""
    if bench.tight:
        return []
    e = bench.estimate
    return [f"{what} {e.median:.2f} is noisy: its 95 % interval is {e.low:.3f}–{e.high:.3f} "
            f"(±{e.spread:.1%}, over {e.rounds} interleaved rounds; tight means within ±{bench.tolerance:.1%}): "
            "the machine was busy; time again on a quiet one before trusting small differences"]
