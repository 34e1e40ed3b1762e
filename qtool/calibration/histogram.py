"""Histograms that stream and merge: exact re-binning as the range grows, and the range searches run on them.

`Histogram` counts values on a grid that shifts or doubles its bin width without losing a count,
and merges with the histogram of another shard of the data exactly;
`kl_threshold` (TensorRT's entropy calibration, vectorized), `kl_ends` (it for both ends of an
asymmetric range) and `least_squared_error` (expected rounding plus clipping error) pick a range
from its counts. Memory is O(bins), never O(values).
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
ENTROPY_ROUNDS = 3  # kl_ends on mixed-sign data: rounds of (lower end, upper end) searches


class Histogram:
    """Counts on `bins` equal bins of width `unit * 2**level`; the grid always covers 0.

    A value's bin is floor(value / width), an integer: the same value always lands in bin n at
    level 0 and n >> k at level k (dividing by a power of two more is exact in floating point).
    A value outside the grid shifts it, or raises the level as often as needed; re-binning is
    exact. So the counts depend only on which values were seen, never on their order or grouping,
    once `unit` is fixed (by the first non-zero values, or given): histograms of data shards
    merge (`merge`) into exactly the histogram of all the data in one stream.
    """

    def __init__(self, bins: int, count_zeros: bool = True, unit: float | None = None):
        self.counts = np.zeros(bins)
        self.unit = unit  # the width at level 0; None until the first non-zero values fix it
        self.level = 0
        self.width = 0.0  # 0 until a non-zero value arrives
        self.start = 0  # the first bin's left edge is start * width
        self.top = 0  # the bin of the largest value seen (or of 0), in the same numbering as start
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
            if self.unit is None:
                self.unit = (hi - lo) / (bins - 1)
            self.width = self.unit
        self._cover(self._bin(lo, values.dtype), self._bin(hi, values.dtype), self.level)
        if self.zeros and not self.counts.any():  # the grid is new: the zeros seen before it
            self.counts[-self.start] += self.zeros
        counts = np.zeros(bins, dtype=np.intp)
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
            if self.start:  # negative values: floor, not truncation (a grid from 0 needs neither)
                np.floor(pos, out=pos)
            np.copyto(idx, pos, casting="unsafe")
            if self.start:
                idx -= self.start
            counts += np.bincount(idx, minlength=bins)
        self.counts += counts

    def merge(self, other: "Histogram") -> None:
        """Add another histogram's counts (same bins and unit, or either without a grid yet)."""
        if other.width == 0:
            if self.width == 0:
                self.zeros += other.zeros
            else:
                self._cover(0, 0, self.level)
                self.counts[-self.start] += other.zeros
                self.zeros += other.zeros if self.count_zeros else 0
            return
        if self.width == 0:
            zeros = self.zeros
            self.unit, self.width, self.level = other.unit, other.width, other.level
            self.start, self.top, self.zeros = other.start, other.top, 0
            self.counts = np.zeros_like(other.counts)
            self._cover(0, 0, self.level)
            self.counts[-self.start] += zeros
            self.zeros = zeros if self.count_zeros else 0
        if other.unit != self.unit:
            raise ValueError(f"histograms of different units ({self.unit!r}, {other.unit!r}) do not merge exactly")
        self._cover(other.start, other.top, other.level)
        self.counts += _rebinned(other.counts, other.start, self.level - other.level, self.start)
        if self.count_zeros:
            self.zeros += other.zeros

    def _bin(self, x: float, dtype: np.dtype) -> int:
        """The bin of value x at the current level, computed as `add` computes a value's."""
        position = np.divide(np.asarray([x], dtype=dtype if dtype.kind == "f" else np.float64), self.width)
        return int(np.floor(position[0]))

    def _cover(self, first: int, last: int, level: int) -> None:
        """Grow the grid to hold bins first..last of `level` and everything held so far: raise the
        level only as far as needed, shift the start, re-bin the counts exactly."""
        bins = len(self.counts)
        common = max(self.level, level)
        low = min(self.start >> (common - self.level), first >> (common - level))
        high = max(self.top >> (common - self.level), last >> (common - level))
        shift = 0
        while (high >> shift) - (low >> shift) >= bins:
            shift += 1
        new_level, new_start = common + shift, low >> shift
        if new_level != self.level or new_start != self.start:
            self.counts = _rebinned(self.counts, self.start, new_level - self.level, new_start)
        self.level, self.start, self.top = new_level, new_start, high >> shift
        self.width = self.unit * 2.0**self.level

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


def _rebinned(counts: np.ndarray, start: int, shift: int, new_start: int) -> np.ndarray:
    """Counts of bins start.. moved `shift` levels up (2**shift bins become one) onto a grid
    starting at new_start; the occupied bins land inside it (empty ones may be clipped)."""
    index = ((start + np.arange(len(counts))) >> shift) - new_start
    index = np.clip(index, 0, len(counts) - 1)
    return np.bincount(index, weights=counts, minlength=len(counts))


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

    hist: counts (float64 or int, shape (bins,)) on equal bins from the point the quantization
    grid represents exactly (0 for |x|, the kept end of an asymmetric range); levels: grid
    points of the searched side. Returns i in [1, bins]: keep bins [0, i).

    Candidate i keeps bins [0, i) and folds the rest into bin i-1 (P); Q merges the kept bins
    into `levels` groups and spreads each group's mass over its non-empty bins. Groups are
    i / levels bins wide, rounded (TensorRT gives the remainder to the last group, which makes
    the result depend on the bin width). Group sums come from cumulative sums, so all
    candidates are scored in one pass of array arithmetic, in place where it can be: the
    (candidates x levels) arrays are what the search costs.

    Candidates keep at least `levels` bins from the first non-empty bin past bin 0 (TensorRT's
    `levels` from 0, for data that starts there): a candidate that keeps a single non-empty bin
    scores 0 (P and Q both one spike), which collapsed data far from 0 (ppocr_cls's
    hardsigmoid_0.tmp_0, all in [0.12, 0.32], to [0.1195, 0.1197]) and, with bin 0 rewritten,
    sparse data (its relu_2.tmp_0, 32 zeros and 32 values, kept none of them: Q all 0, -inf).

    Bin 0 is scored with its neighbour's count, as NVIDIA's pytorch-quantization does
    (`_compute_amax_entropy`: `bins[0] = bins[1]`): it holds the exactly represented point,
    where ReLU zeros (or a clamp's bound) pile up. Q spreads that spike over group 0, so a
    spike of mass s costs about s * log(i / levels) and drove i down: u2netp's ReLU outputs
    (45-77 % zeros) kept a quarter of their range and clipped up to 12 % of their values.
    Sources: Migacz, "8-bit Inference with TensorRT" (GTC 2017); onnxruntime.quantization's
    HistogramCollector.get_entropy_threshold.
    """
    n = int(np.flatnonzero(hist)[-1]) + 1
    if n <= levels:
        return n
    hist = hist[:n].astype(np.float64)  # a copy: bin 0 is rewritten
    hist[0] = hist[1]
    lowest = int(np.flatnonzero(hist[1:])[0]) + levels  # `levels` bins from the first data past bin 0
    if n <= lowest:
        return n
    candidates = min(n - lowest + 1, MAX_KL_CANDIDATES)
    keep = np.unique(np.linspace(lowest, n, candidates).round().astype(np.intp))
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


def kl_ends(counts: np.ndarray, levels: int, start: int, folded: int | None) -> tuple[int, int]:
    """The asymmetric entropy range's ends, as bin numbers (value = number * bin width).

    counts: the signed histogram's counts (shape (bins,)) of bins start, start + 1, ... (so bin
    -start has its left edge at 0); levels: the grid's points (256 for uint8); folded: the
    symmetric search's threshold on |x| (`kl_threshold` of the folded counts, in bins) for
    mixed-sign data, None for one-signed data (the grid starts at 0).

    Each end is searched with `kl_threshold` on the counts from the other end, which is fixed:
    the search's bin 0 is then the grid's exactly represented end. One-signed: the upper end
    searched up from 0. Mixed: coordinate descent from (-folded, ...): the upper end searched up
    from the lower, the lower down from the upper, until neither moves (at most ENTROPY_ROUNDS
    rounds). Starting there, not from the observed min, matters: each search keeps at least
    `levels` bins, so from the far end of a long short side the ends could never close in on a
    narrow core (Laplace data with outliers on both sides stayed at [-11, 29] for [-100, 100]).
    Both ends stay on their side of 0.
    """
    zero = -start
    low = zero if folded is None else max(zero - folded, 0)
    high = max(low + kl_threshold(counts[low:], levels), zero)
    for _ in range(0 if folded is None else ENTROPY_ROUNDS):
        new_low = min(high - kl_threshold(counts[:high][::-1], levels), zero)
        new_high = max(new_low + kl_threshold(counts[new_low:], levels), zero)
        if (new_low, new_high) == (low, high):
            break
        low, high = new_low, new_high
    return start + low, start + high


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
