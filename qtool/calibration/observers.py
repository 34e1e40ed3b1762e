"""Observers turn a stream of activation batches into one range per tensor.

Protocol: `update(batch)` any number of times, then `result()` and `summary()`.
An observer never keeps activations: its memory is O(bins), whatever the number of batches.
Observers of consecutive shards of the data merge (`merge_shards`) into exactly the observer of
the whole data seen in one stream: same range, same summary, bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from qtool.calibration.histogram import Histogram, kl_ends, kl_threshold, least_squared_error
from qtool.numerics import QType, quant_bounds
from qtool.recipe.schema import CalibrationSpec

SUMMARY_PERCENTILES = (50.0, 99.0, 99.9, 99.99)


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float


class Observer(Protocol):
    def update(self, batch: np.ndarray) -> None: ...

    def result(self) -> Range: ...

    def summary(self) -> dict: ...


def _finite(batch: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The batch's finite values, flat, with their min and max: inf and nan never widen a range.

    min and max come first: when both are finite (nan propagates into them) every value is,
    and the batch is used as it is, without an isfinite pass or a copy.
    """
    flat = np.ravel(batch)
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    if not flat.size:
        return flat, math.inf, -math.inf
    lo, hi = float(flat.min()), float(flat.max())
    if math.isfinite(lo) and math.isfinite(hi):
        return flat, lo, hi
    flat = flat[np.isfinite(flat)]
    if not flat.size:
        return flat, math.inf, -math.inf
    return flat, float(flat.min()), float(flat.max())


def _samples(batch: np.ndarray) -> int:
    return int(batch.shape[0]) if np.ndim(batch) else 1


class _Drift:
    """Remembers the range part-way through calibration, so a summary can say if it had settled.

    With `expected` samples known, the snapshot is taken when 90 % of them have been seen;
    otherwise whenever the sample count passes a power of two. Drift is the largest move of
    either bound since the latest earlier snapshot, as a fraction of the range's width.
    """

    def __init__(self, expected: int | None):
        self.expected = expected
        self.samples = 0
        self.snapshots: list[tuple[int, Range]] = []  # at most two: (samples, range)

    def step(self, samples: int, result: Callable[[], Range]) -> None:
        before, self.samples = self.samples, self.samples + samples
        if self.expected:
            due = before < 0.9 * self.expected <= self.samples
        else:
            due = before.bit_length() < self.samples.bit_length()
        if due:
            self.snapshots = [*self.snapshots, (self.samples, result())][-2:]

    def report(self, final: Range) -> dict:
        earlier = [(at, r) for at, r in self.snapshots if at < self.samples]
        if not earlier:
            return {"range_drift": None, "range_drift_since": None}
        at, then = earlier[-1]
        moved = max(abs(final.lo - then.lo), abs(final.hi - then.hi))
        width = max(final.hi - final.lo, then.hi - then.lo)
        return {"range_drift": float(moved / width) if width > 0 else 0.0, "range_drift_since": at}


class MinMaxObserver:
    """Running min/max, or an exponential moving average of per-batch min/max."""

    def __init__(
        self,
        spec: CalibrationSpec,
        qtype: QType,
        symmetric: bool,
        expected_samples: int | None = None,
    ):
        self.momentum = spec.moving_average
        self.lo: float | None = None
        self.hi: float | None = None
        self.batches = 0
        self.drift = _Drift(expected_samples)
        self.shard = False  # observing one shard of the data: keeps its runs' (min, max) for the merge
        self.runs: list[tuple[float, float]] = []

    def update(self, batch: np.ndarray) -> None:
        finite, lo, hi = _finite(batch)
        self.update_range(lo, hi, finite.size, _samples(batch))

    def update_range(self, lo: float, hi: float, values: int, samples: int) -> None:
        """`update` from a run's finite min and max measured elsewhere (calibration/reductions.py):
        `values` finite values (0: the range stays), `samples` the run's length along axis 0 (1 for a scalar)."""
        if values:
            self._step(lo, hi)
            if self.shard:
                self.runs.append((lo, hi))
        self.drift.step(samples, self._partial if self.shard else self.result)

    def _step(self, lo: float, hi: float) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.momentum > 0:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.batches += 1

    def _partial(self) -> "MinMaxObserver":
        part = copy.copy(self)
        part.runs, part.drift = list(self.runs), None
        return part

    def absorb(self, part: "MinMaxObserver") -> None:
        """Continue with the runs of the shard after this one: the moving average replays them."""
        if self.momentum > 0:
            for lo, hi in part.runs:
                self._step(lo, hi)
        elif part.lo is not None:
            if self.lo is None:
                self.lo, self.hi = part.lo, part.hi
            else:
                self.lo, self.hi = min(self.lo, part.lo), max(self.hi, part.hi)
            self.batches += part.batches

    def result(self) -> Range:
        if self.lo is None:
            return Range(0.0, 0.0)
        return Range(self.lo, self.hi)

    def summary(self) -> dict:
        # A moving average may clip values; without a histogram we cannot say how many.
        clipped = 0.0 if self.momentum == 0 else None
        return {
            "samples": self.drift.samples,
            "batches": self.batches,
            "clipped_fraction": clipped,
            **self.drift.report(self.result()),
        }


class _HistogramObserver:
    """What percentile, entropy and mse share: a histogram of x, or of |x| when symmetric."""

    needs_zeros = False  # whether the range search reads the count of exact zeros

    def __init__(
        self,
        spec: CalibrationSpec,
        qtype: QType,
        symmetric: bool,
        expected_samples: int | None = None,
    ):
        self.spec, self.qtype, self.symmetric = spec, qtype, symmetric
        self.hist = Histogram(spec.bins, count_zeros=self.needs_zeros)
        self.lo, self.hi = math.inf, -math.inf  # observed extremes of x
        self.drift = _Drift(expected_samples)
        self._result: Range | None = None  # the threshold searches cost milliseconds: once per update
        self.shard = False  # observing one shard of the data: range drift snapshots hold states

    def update(self, batch: np.ndarray) -> None:
        values, lo, hi = _finite(batch)
        if values.size:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
            if self.symmetric:
                self.hist.add(values, 0.0, max(-lo, hi), absolute=True)
            else:
                self.hist.add(values, lo, hi)
            self._result = None
        self.drift.step(_samples(batch), self._partial if self.shard else self.result)

    def _partial(self) -> "_HistogramObserver":
        part = copy.copy(self)
        part.hist, part.drift = copy.deepcopy(self.hist), None
        return part

    def absorb(self, part: "_HistogramObserver") -> None:
        """Add the counts and extremes of the shard after this one (merging is exact)."""
        self.hist.merge(part.hist)
        self.lo, self.hi = min(self.lo, part.lo), max(self.hi, part.hi)
        self._result = None

    def result(self) -> Range:
        if self.hist.width == 0:  # nothing seen, or only zeros
            return Range(0.0, 0.0)
        if self._result is None:
            lo, hi = self._choose()
            self._result = Range(float(max(lo, self.lo)), float(min(hi, self.hi)))
        return self._result

    def _choose(self) -> tuple[float, float]:
        raise NotImplementedError

    def summary(self) -> dict:
        final = self.result()
        of = "|x|" if self.symmetric else "x"
        out: dict = {"samples": self.drift.samples, "percentiles_of": of}
        top = max(-self.lo, self.hi) if self.symmetric else self.hi
        bottom = 0.0 if self.symmetric else self.lo
        for p in SUMMARY_PERCENTILES:
            value = np.clip(self.hist.quantile(p / 100), bottom, top) if self.hist.width else 0.0
            out[f"p{p:g}"] = float(value)
        # An end at the observed extreme clips nothing: interpolating within its bin would count
        # part of a spike there (speech_embedding's Maximum(x, -0.4): 25 %) as clipped.
        if self.hist.width == 0:
            clipped = 0.0
        elif self.symmetric:
            t = max(-final.lo, final.hi)
            clipped = 0.0 if t >= top else 1.0 - self.hist.cdf(t)
        else:
            clipped = (0.0 if final.lo <= self.lo else self.hist.cdf(final.lo)) + (
                0.0 if final.hi >= self.hi else 1.0 - self.hist.cdf(final.hi))
        out["clipped_fraction"] = float(np.clip(clipped, 0.0, 1.0))
        return {**out, **self.drift.report(final)}


def _percentile_range(observer: "_HistogramObserver", percentile: float) -> tuple[float, float]:
    t = observer.hist.abs_quantile(percentile / 100)
    return -t, t


def _mse_range(observer: "_HistogramObserver") -> tuple[float, float]:
    qmin, qmax = quant_bounds(observer.qtype, observer.symmetric)
    if observer.symmetric:
        hi = max(-observer.lo, observer.hi)
        lo = -hi
    else:
        lo, hi = min(observer.lo, 0.0), max(observer.hi, 0.0)
    return least_squared_error(observer.hist, lo, hi, qmax - qmin)


class PercentileObserver(_HistogramObserver):
    """Drops the rarest (100 - p) % of values, those farthest from 0, so a few outliers cannot
    stretch the scale: t is the p-th percentile of |x|, the range (-t, t) cut to the observed
    [min, max] (so one-signed data keep 0..t, and a skewed tensor its short side whole).

    Not a percentile per side: that clipped (100 - p) % at each end, cutting the short side
    of skewed tensors (residual Adds) far inside values the long side kept; on ppocr_det
    (uint8, 99.99) cosine 0.948 per side, 0.958 with (100 - p) / 2 per side, 0.962 this way.
    """

    def _choose(self) -> tuple[float, float]:
        return _percentile_range(self, self.spec.percentile)


class EntropyObserver(_HistogramObserver):
    """TensorRT's calibration: the threshold whose clipped, quantized histogram loses the least
    information (KL divergence; `kl_threshold`).

    Symmetric: threshold t on |x|, range (-t, t), with half the type's levels (128 for int8).
    Asymmetric: the grid [lo, hi] has all the levels (256 for uint8), and each end is searched
    on the signed counts with the other end fixed, so the search's bin 0 is always the grid's
    fixed end: for one-signed data the upper end from 0 (mirrored for negative data); for
    mixed-sign data each end in turn from the other until neither moves, starting from the
    symmetric search's (-t, t) (`kl_ends`).
    Searching |x| with half the levels and cutting (-t, t) to [min, max], as before, scored a
    skewed tensor's short side as its long side's: speech_embedding's Maximum(x, -0.4) outputs,
    a spike at -0.4 folded onto |x| = 0.4, kept a fifth of their range and clipped up to 31 %
    of their values.

    Data of one sign far from 0 (every |x| >= m > 0): the search keeps at least `levels` bins
    past m (`kl_threshold`); before, a t <= m (all of it folded into one bin, scored lossless)
    inverted the range (ppocr_cls's conv2d_56.tmp_1, all in [-1.5, -0.88]: lo -0.45 > hi -0.88).
    """

    def _choose(self) -> tuple[float, float]:
        levels = self.qtype.qmax - self.qtype.qmin + 1
        hist = self.hist
        mixed = self.lo < 0 < self.hi
        folded = kl_threshold(hist.folded(), levels // 2) if self.symmetric or mixed else None
        if self.symmetric:
            return -folded * hist.width, folded * hist.width
        counts = hist.counts[: hist.top - hist.start + 1]  # bins start..top: min(lo, 0) .. max(hi, 0)
        if self.hi >= -self.lo:  # long side positive
            return tuple(end * hist.width for end in kl_ends(counts, levels, hist.start, folded))
        # the mirror image: bins counted down from max(hi, 0)
        return tuple(-end * hist.width for end in kl_ends(counts[::-1], levels, -hist.top - 1, folded))[::-1]


class MseObserver(_HistogramObserver):
    """The range with the least expected squared error: rounding inside it, clipping outside.

    Candidates shrink the observed range toward 0 by one factor a in (0, 1]: (-a|x|max, a|x|max)
    when symmetric, (a min, a max) otherwise (one search for both bounds).
    """

    needs_zeros = True

    def _choose(self) -> tuple[float, float]:
        return _mse_range(self)


AUTO_PERCENTILES = (99.9, 99.99, 99.999)


class CandidateObserver(_HistogramObserver):
    """`calibration.method: auto`: one histogram, several candidate ranges read from it — minmax, the
    percentile ranges of AUTO_PERCENTILES and `calibration.percentile` (as PercentileObserver) and the
    mse optimum (as MseObserver), each cut to the observed [min, max]. `result()` is the minmax range
    until qtool.evaluation.method_choice picks among `summary()["candidates"]` ({name: [lo, hi]})."""

    needs_zeros = True

    def candidates(self) -> dict[str, Range]:
        if self.hist.width == 0:
            return {"minmax": self.result()}
        found = {"minmax": (self.lo, self.hi),
                 **{f"p{p:g}": _percentile_range(self, p) for p in dict.fromkeys([*AUTO_PERCENTILES, self.spec.percentile])},
                 "mse": _mse_range(self)}
        return {name: Range(float(max(lo, self.lo)), float(min(hi, self.hi))) for name, (lo, hi) in found.items()}

    def _choose(self) -> tuple[float, float]:
        return self.lo, self.hi

    def summary(self) -> dict:
        return {**super().summary(), "candidates": {name: [r.lo, r.hi] for name, r in self.candidates().items()}}


ObserverFactory = Callable[..., Observer]

OBSERVERS: dict[str, ObserverFactory] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
    "auto": CandidateObserver,
}


def make_observer(
    spec: CalibrationSpec, qtype: QType, symmetric: bool, expected_samples: int | None = None
) -> Observer:
    """The observer the spec names; `expected_samples`, if known, lets it report range drift."""
    return OBSERVERS[spec.method](spec, qtype, symmetric, expected_samples=expected_samples)


def histogram_unit(observer: Observer) -> float | None:
    """The bin unit an observer's histogram has fixed (None: no histogram, or no grid yet)."""
    hist = getattr(observer, "hist", None)
    return hist.unit if hist is not None and hist.width else None


def shard_observer(spec: CalibrationSpec, qtype: QType, symmetric: bool, expected_samples: int | None,
                   offset: int, unit: float | None) -> Observer:
    """An observer of one shard of the data, which starts after `offset` samples; its histogram
    bins on `unit` (that of the observer of the data's first sample), so that `merge_shards` is exact."""
    observer = make_observer(spec, qtype, symmetric, expected_samples)
    observer.shard = True
    observer.drift.samples = offset
    if unit is not None:
        observer.hist.unit = unit
    return observer


def merge_shards(first: Observer, parts: list[Observer]) -> Observer:
    """`first` (which saw the data's first samples in this process) followed by the observers of
    the next shards, in data order: the observer one stream over all of it would have been.

    Range-drift snapshots a shard took hold its own partial state; each becomes the range of
    everything before it plus that state, as one stream would have measured it then. Raises
    ValueError where a shard's histogram unit differs from `first`'s (it must be observed again
    with the unit given).
    """
    merged = first
    for part in parts:
        for at, partial in part.drift.snapshots:
            probe = copy.deepcopy(merged)
            probe.absorb(partial)
            merged.drift.snapshots = [*merged.drift.snapshots, (at, probe.result())][-2:]
        merged.absorb(part)
        merged.drift.samples = part.drift.samples
    return merged
