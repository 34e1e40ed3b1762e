"""Interleaved A/B latency of two models in one process on ONNX Runtime (the run's execution providers).

Rounds alternate the order (AB, BA, ...) so drift in clocks, caches and
neighbours lands on both models alike; the ratio is the figure to trust.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from qtool.runtime.session import make_session


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms, "runs": self.runs}


@dataclass(frozen=True)
class BenchResult:
    reference: Latency
    candidate: Latency
    threads: int | None
    warmup: int
    batch_size: int
    provider: str  # the execution provider the quantized model's session runs on first

    @property
    def ratio(self) -> float:
        """Candidate median over reference median: below 1 the candidate is faster."""
        return self.candidate.median_ms / self.reference.median_ms if self.reference.median_ms else float("inf")


def _summary(times: list[float]) -> Latency:
    ms = np.asarray(times) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return Latency(float(median), float(p10), float(p90), len(times))


def bench_models(
    reference: ModelProto,
    candidate: ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 200,
    max_seconds: float = 4.0,
) -> BenchResult:
    """Time both models on the same feeds, alternating, until `rounds` or `max_seconds` (at least 10 rounds)."""
    sessions = [make_session(reference, threads=threads), make_session(candidate, threads=threads)]
    names = [[output.name for output in s.get_outputs()] for s in sessions]
    for _ in range(warmup):
        for session, outputs in zip(sessions, names):
            session.run(outputs, feeds)
    times: list[list[float]] = [[], []]
    start = time.perf_counter()
    for i in range(rounds):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            began = time.perf_counter()
            sessions[which].run(names[which], feeds)
            times[which].append(time.perf_counter() - began)
        if i >= 9 and time.perf_counter() - start > max_seconds:
            break
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    return BenchResult(_summary(times[0]), _summary(times[1]), threads, warmup, batch, sessions[1].get_providers()[0])


def latency_section(bench: BenchResult) -> dict:
    """The report's latency section (qtool/reporting/schemas/report.schema.json): both models' figures and how they were taken."""
    return {
        "reference": bench.reference.as_dict(),
        "candidate": bench.candidate.as_dict(),
        "ratio": bench.ratio,
        "threads": bench.threads,
        "warmup": bench.warmup,
        "batch_size": bench.batch_size,
        "provider": bench.provider,
        "method": "interleaved A/B in one process, order alternating each round",
    }
