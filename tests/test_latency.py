"""The interleaved timing's decision logic (when to stop, how sure the ratio is), on injected timings: no
wall-clock figure is asserted."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qtool.evaluation.latency import MIN_ROUNDS, interleave, ratio_estimate


class FakeClock:
    """A clock that the runners advance by the durations they are given, one per call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations):
        durations = iter(durations)

        def run():
            self.now += next(durations)
        return run


def test_ratio_interval_is_the_order_statistics_around_the_median():
    estimate = ratio_estimate([1.0] * 10 + [2.0] * 10)
    assert (estimate.low, estimate.high, estimate.rounds) == (1.0, 2.0, 20)
    steady = ratio_estimate([0.8] * 30)
    assert steady.median == steady.low == steady.high == 0.8 and steady.spread == 0.0
    ramp = ratio_estimate([i / 100 for i in range(1, 101)])  # 1 % .. 100 %: n=100, ranks 40 and 59 (0-based)
    assert (ramp.low, ramp.high) == (pytest.approx(0.41), pytest.approx(0.60))


def test_a_steady_ratio_stops_at_the_minimum_rounds_even_when_each_run_is_slow_and_noisy():
    """A busy machine slows both models alike within a round: the per-round ratio stays 0.5 and is tight."""
    clock = FakeClock()
    load = [1.0, 3.0, 7.0, 2.0] * 100  # seconds of each round's slowdown, far past max_seconds
    reference = clock.runner(load)
    candidate = clock.runner(0.5 * x for x in load)
    times = interleave(reference, candidate, max_seconds=1.0, clock=clock)
    assert len(times[0]) == len(times[1]) == MIN_ROUNDS  # the minimum is kept past the time bound
    assert ratio_estimate([c / r for r, c in zip(*times)]).spread == 0.0


def test_a_noisy_ratio_runs_until_the_time_bound_and_a_tight_one_stops_early():
    clock = FakeClock()
    rng = np.random.default_rng(0)
    noisy = interleave(clock.runner(itertools.repeat(0.01)), clock.runner(0.01 * rng.uniform(0.5, 1.5, 10_000)),
                       max_rounds=10_000, max_seconds=5.0, clock=clock)
    assert MIN_ROUNDS < len(noisy[0]) < 10_000 and clock.now > 5.0  # the time bound ended it
    assert ratio_estimate([c / r for r, c in zip(*noisy)]).spread > 0.03
    clock = FakeClock()
    tight = interleave(clock.runner(itertools.repeat(0.01)),
                       clock.runner(itertools.cycle([0.008, 0.0081, 0.0079])),
                       max_rounds=10_000, max_seconds=30.0, clock=clock)
    assert len(tight[0]) == MIN_ROUNDS


def test_rounds_alternate_which_model_runs_first():
    order = []
    interleave(lambda: order.append("float"), lambda: order.append("quant"), min_rounds=4, max_rounds=4,
               clock=itertools.count().__next__)
    assert order == ["float", "quant", "quant", "float", "float", "quant", "quant", "float"]
