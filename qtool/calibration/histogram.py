"""Histograms that stream: exact re-binning as the range grows, and the range searches run on them.

`Histogram` counts values on a grid that shifts or doubles its bin width without losing a count;
`kl_threshold` (TensorRT's entropy calibration, vectorized) and `least_squared_error` (expected
rounding plus clipping error) pick a range from its counts. Memory is O(bins), never O(values).
"""

from __future__ import annotations

import math

import numpy as np

# Thresholds the entropy search scores: at most 512, so a 2048-bin histogram is searched in steps
# of <= 3.5 bins (0.17 % of its range) in ~2 ms instead of ~17 ms for every bin (1,793 x 257 groups).
MAX_KL_CANDIDATES = 512
CHUNK = 1 << 15  # values binned at a time: the chunk's float and index copies fit in L2 cache
KL_EPSILON = 1e-4  # Q's floor where P has mass: a threshold in a sparse tail costs, not forbids
# Added to Q before its log: far below half an ulp of any non-zero Q (a count over at most
# `bins` bins), so only empty groups change (log 0 -> -690, finite, times P = 0).
TINY = 1e-300


class Histogram:
    """Counts on `bins` equal bins whose edges are multiples of `width`; the grid always covers 0.

    A value outside the grid shifts it, or doubles the width as often as needed. Edges stay
    multiples of the old width, so each new bin is a whole number of old bins: re-binning is exact.
    """

    def __init__(self, bins: int, count_zeros: bool = True):
        self.counts = np.zeros(bins)
        self.width = 0.0  # 0 until a non-zero value arrives
        self.start = 0  # the first bin's left edge is start * width
        # Exact zeros are representable: they carry no rounding error. Only the mse search
        # needs them once a grid exists; counting costs two passes over every value.
        self.count_zeros = count_zeros
        self.zeros = 0

    def add(self, values: np.ndarray, lo: float, hi: float, absolute: bool = False) -> None:
        """Count finite flat `values` (their magnitudes when `absolute`); lo, hi: their min and max
        (of the magnitudes when `absolute`)."""
        bins = len(self.counts)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.width == 0:
            if hi == lo:
                self.zeros += values.size  # only zeros so far: counted once a grid exists
                return
            self.width = (hi - lo) / (bins - 1)
            self.start = math.floor(lo / self.width)
            self.counts[min(-self.start, bins - 1)] += self.zeros
        else:
            self._grow(lo, hi)
        counts = np.zeros(bins + 1, dtype=np.intp)  # + 1: values rounded onto the top edge
        position = np.empty(min(values.size, CHUNK), dtype=values.dtype)
        # int32: numpy casts float32 -> int32 with SIMD, -> int64 one value at a time; bincount's own
        # widening of int32 costs less (updates 2.2 -> 1.9 ns per value on ppocr_det's activations)
        index = np.empty(len(position), dtype=np.int32)
        for at in range(0, values.size, CHUNK):  # chunks stay in cache across the passes below
            chunk = values[at : at + CHUNK]
            n = len(chunk)
            pos, idx = position[:n], index[:n]
            if self.count_zeros:
                self.zeros += int(np.count_nonzero(chunk == 0))
            if absolute:
                np.abs(chunk, out=pos)
                chunk = pos
            np.divide(chunk, self.width, out=pos)  # float32 stays float32: half the memory traffic
            if self.start:  # a grid starting at 0 (|x|, ReLU outputs) needs no shift
                pos -= self.start
            np.copyto(idx, pos, casting="unsafe")  # values lie inside the grid: truncation is floor
            counts += np.bincount(idx, minlength=bins + 1)
        counts[bins - 1] += counts[bins]  # the top edge belongs to the last bin
        self.counts += counts[:bins]

    def _grow(self, lo: float, hi: float) -> None:
        """Fit [lo, hi] and the occupied bins: shift the grid, doubling the width only if needed."""
        bins, width = len(self.counts), self.width
        if math.floor(lo / width) >= self.start and math.floor(hi / width) < self.start + bins:
            return
        first, last = (int(i) + self.start for i in np.flatnonzero(self.counts)[[0, -1]])
        factor = 1
        while True:
            width = self.width * factor
            low = min(math.floor(lo / width), first // factor)
            high = max(math.floor(hi / width), last // factor)
            if high - low < bins:
                break
            factor *= 2
        merged = np.floor((self.start + np.arange(bins)) / float(factor)) - low
        merged = np.clip(merged, 0, bins - 1).astype(np.intp)  # only empty bins are clipped
        self.counts = np.bincount(merged, weights=self.counts, minlength=bins)
        self.width, self.start = width, low

    @property
    def total(self) -> float:
        return float(self.counts.sum()) if self.width else float(self.zeros)

    def centers(self) -> np.ndarray:
        return (self.start + np.arange(len(self.counts)) + 0.5) * self.width

    def quantile(self, q: float) -> float:
        """The value below which a fraction q of the counts lie, interpolated within its bin."""
        return _quantile(self.counts, self.start, self.width, q) if self.width else 0.0

    def abs_quantile(self, q: float) -> float:
        """The same for |x|: on the folded counts (bin 0 starts at 0)."""
        return _quantile(self.folded(), 0, self.width, q) if self.width else 0.0

    def cdf(self, x: float) -> float:
        """The fraction of counts below x, interpolated within its bin."""
        if self.width == 0:
            return float(x > 0)
        pos = x / self.width - self.start
        j = int(np.clip(math.floor(pos), 0, len(self.counts) - 1))
        below = self.counts[:j].sum() + np.clip(pos - j, 0.0, 1.0) * self.counts[j]
        return float(below / self.counts.sum())

    def folded(self) -> np.ndarray:
        """Counts of |x| on the same width, bin 0 starting at 0 (exact: edges are multiples)."""
        index = self.start + np.arange(len(self.counts))
        return np.bincount(np.where(index >= 0, index, -index - 1), weights=self.counts)


def _quantile(counts: np.ndarray, start: int, width: float, q: float) -> float:
    cum = np.cumsum(counts)
    target = q * cum[-1]
    j = min(int(np.searchsorted(cum, target)), len(cum) - 1)
    inside = (target - (cum[j] - counts[j])) / counts[j] if counts[j] else 0.0
    return float((start + j + inside) * width)


def _xlogx(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x), 0.0)


def kl_threshold(hist: np.ndarray, levels: int) -> int:
    """How many bins of a one-sided histogram to keep: TensorRT's KL search, vectorized.

    Candidate i keeps bins [0, i) and folds the rest into bin i-1 (P); Q merges the kept bins
    into `levels` groups and spreads each group's mass over its non-empty bins. Groups are
    i / levels bins wide, rounded (TensorRT gives the remainder to the last group, which makes
    the result depend on the bin width). Group sums come from cumulative sums, so all
    candidates are scored in one pass of array arithmetic, in place where it can be: the
    (candidates x levels) arrays are what the search costs.
    """
    n = int(np.flatnonzero(hist)[-1]) + 1
    if n <= levels:
        return n
    hist = hist[:n]
    candidates = min(n - levels + 1, MAX_KL_CANDIDATES)
    keep = np.unique(np.linspace(levels, n, candidates).round().astype(np.intp))
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    nonzero_cum = np.concatenate([[0.0], np.cumsum(hist > 0, dtype=np.float64)])
    plogp_cum = np.concatenate([[0.0], np.cumsum(_xlogx(hist))])
    total = cum[-1]

    edges = np.multiply.outer(keep, np.arange(levels + 1))  # group edges, one row per candidate
    if levels & (levels - 1):
        edges //= levels
    else:  # a power of two, as for every integer type: the same floor without integer division
        edges >>= levels.bit_length() - 1
    mass = np.diff(cum.take(edges), axis=1)
    nonzero = np.diff(nonzero_cum.take(edges), axis=1)
    outliers = total - cum[keep]
    last = hist[keep - 1]
    nonzero[:, -1] += (last == 0) & (outliers > 0)
    np.maximum(nonzero, 1.0, out=nonzero)

    with np.errstate(divide="ignore", invalid="ignore"):
        q_floor = KL_EPSILON * cum[keep]  # TensorRT's smoothing where Q is empty (last group only)
        q_last = np.log(np.where(mass[:, -1] > 0, mass[:, -1] / nonzero[:, -1], q_floor))
        q_value = np.divide(mass, nonzero, out=nonzero)
        q_value += TINY  # empty groups: log stays finite, and P = 0 there zeroes the product
        np.log(q_value, out=q_value)
        q_value[:, -1] = q_last
        mass[:, -1] += outliers  # mass becomes P
        plogq = np.multiply(mass, q_value, out=mass).sum(axis=1)
        plogp = plogp_cum[keep - 1] + _xlogx(last + outliers)
        kl = (plogp - plogq) / total - np.log(total) + np.log(cum[keep])
    return int(keep[np.argmin(kl)])


def _tail_error(centers: np.ndarray, counts: np.ndarray, width: float, bounds: np.ndarray):
    """For each bound t: mass and squared clipping error of the bins centred above t.

    Values are taken as uniform within their bin, hence the width^2 / 12 per value.
    """
    suffix = lambda a: np.concatenate([np.cumsum(a[::-1])[::-1], [0.0]])  # noqa: E731
    s0 = suffix(counts)
    s1 = suffix(counts * centers)
    s2 = suffix(counts * (centers**2 + width**2 / 12))
    k = np.searchsorted(centers, bounds, side="right")
    return s0[k], s2[k] - 2 * bounds * s1[k] + bounds**2 * s0[k]


def least_squared_error(hist: Histogram, lo: float, hi: float, steps: int) -> tuple[float, float]:
    """Search (a lo, a hi) for a in (0, 1]: each value inside costs step^2 / 12 (exact zeros
    nothing), each value outside its squared distance to the bound it is clipped to."""
    scale = np.arange(1, len(hist.counts) + 1) / len(hist.counts)
    los, his = scale * lo, scale * hi
    centers, counts = hist.centers(), hist.counts
    above, above_error = _tail_error(centers, counts, hist.width, his)
    below, below_error = _tail_error(-centers[::-1], counts[::-1], hist.width, -los)
    inside = np.maximum(hist.total - above - below - hist.zeros, 0.0)
    error = ((his - los) / steps) ** 2 / 12 * inside + above_error + below_error
    best = int(np.argmin(error))
    return float(los[best]), float(his[best])
