"""Observers: streaming equals batch, bounded memory, and ranges checked against references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qtool.calibration.histogram import Histogram, kl_threshold
from qtool.calibration.observers import OBSERVERS, MinMaxObserver, Range, make_observer
from qtool.numerics import QTYPES, dequantize, quantize, scale_zero_point
from qtool.recipe.schema import CalibrationSpec

METHODS = ["minmax", "percentile", "entropy", "mse", "auto"]
MODES = [("int8", True), ("uint8", False)]  # (activation type, symmetric)


def observe(method, batches, qtype="int8", symmetric=True, expected=None, **spec):
    observer = make_observer(
        CalibrationSpec(method=method, **spec), QTYPES[qtype], symmetric, expected_samples=expected
    )
    for batch in batches:
        observer.update(np.asarray(batch, dtype=np.float32))
    return observer


def laplace_with_outliers(seed=0, n=200_000, outliers=10):
    rng = np.random.default_rng(seed)
    x = rng.laplace(0.0, 1.0, n)
    where = rng.choice(n, outliers, replace=False)
    x[where] = rng.choice([-1.0, 1.0], outliers) * rng.uniform(50.0, 100.0, outliers)
    return x.astype(np.float32)


def state_bytes(observer) -> int:
    """Bytes held in numpy arrays by the observer and the objects it owns."""
    total, todo = 0, [observer]
    while todo:
        obj = todo.pop()
        for value in vars(obj).values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                todo.append(value)
    return total


def test_table_names_every_method():
    assert sorted(OBSERVERS) == sorted(METHODS)


def test_rebinned_histogram_equals_histogram_of_all_values_on_final_grid():
    rng = np.random.default_rng(1)
    # each batch reaches further (first right, then left): the grid shifts and doubles
    batches = [rng.uniform(-0.1, 0.2, 500), rng.uniform(0, 3, 500), rng.uniform(-7, 1, 500)]
    batches += [rng.normal(0, 1, 500), rng.uniform(-40, 90, 500), np.zeros(100)]
    hist = Histogram(256)
    for batch in batches:
        hist.add(batch, float(batch.min()), float(batch.max()))
    everything = np.concatenate(batches)
    edges = (hist.start + np.arange(257)) * hist.width
    assert edges[0] <= everything.min() and everything.max() <= edges[-1]
    assert hist.width <= 2 * 130 / 255  # grown by doubling, yet at most 2x the tightest fit
    expected, _ = np.histogram(everything, bins=edges)
    np.testing.assert_array_equal(hist.counts, expected)
    assert hist.zeros == 100


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_one_batch(method, qtype, symmetric):
    rng = np.random.default_rng(2)
    data = rng.normal(0.5, 1.0, (200, 512)).astype(np.float32)
    order = np.argsort(np.abs(data).max(axis=1))  # later batches widen the range: re-binning
    one = observe(method, [data], qtype, symmetric)
    many = observe(method, (data[i : i + 1] for i in order), qtype, symmetric)
    a, b = one.result(), many.result()
    if method == "minmax":
        tolerance = 0.0
    elif method == "entropy":
        # The KL minimum of Gaussian data is flat: in 16 seeded trials its argmin moved by up to 6 %
        # of the range between grids less than 2x apart. Exactness of the re-binning itself is
        # tested above, and the KL search against a direct implementation below.
        tolerance = 0.06 * (a.hi - a.lo)
    else:  # within two bins of the (coarser) streamed histogram
        tolerance = 2 * many.hist.width
    assert abs(a.lo - b.lo) <= tolerance and abs(a.hi - b.hi) <= tolerance, (a, b)


@pytest.mark.parametrize("method", METHODS)
def test_memory_does_not_grow_with_batches(method):
    rng = np.random.default_rng(3)
    observer = observe(method, [rng.normal(0, 1, (8, 64)) for _ in range(10)], expected=None)
    before = state_bytes(observer)
    for scale in np.linspace(1, 50, 300):  # more batches, ever wider: still the same state
        observer.update((rng.normal(0, scale, (8, 64))).astype(np.float32))
    assert state_bytes(observer) == before
    if method != "minmax":
        assert before <= 2 * 8 * CalibrationSpec().bins


@pytest.mark.parametrize("p", [99.0, 99.9])
def test_percentile_on_uniform_matches_the_analytic_value(p):
    rng = np.random.default_rng(4)
    batches = [rng.uniform(-1, 1, 10_000) for _ in range(20)]
    symmetric = observe("percentile", batches, "int8", True, percentile=p).result()
    assert symmetric.hi == pytest.approx(p / 100, abs=2e-3)  # |x| ~ U(0, 1)
    assert symmetric.lo == -symmetric.hi
    asymmetric = observe("percentile", batches, "uint8", False, percentile=p).result()
    # the same (100 - p) % of values, the farthest from 0 (on a histogram of x, not |x|)
    assert asymmetric.hi == pytest.approx(symmetric.hi, abs=2e-3)
    assert asymmetric.lo == pytest.approx(symmetric.lo, abs=2e-3)


def test_percentile_keeps_the_short_side_of_a_skewed_tensor():
    rng = np.random.default_rng(15)
    x = np.concatenate([rng.uniform(-1, 0, 100_000), rng.uniform(0, 3, 100_000)])
    observer = observe("percentile", [x], "uint8", False, percentile=99.0)
    r, width = observer.result(), observer.hist.width
    assert r.hi == pytest.approx(np.percentile(np.abs(x), 99.0), abs=width)  # the long side is cut
    assert r.lo == pytest.approx(x.min(), abs=width)  # the short side kept whole (not at -0.98)


def test_percentile_interpolates_within_a_bin():
    x = np.random.default_rng(14).uniform(0, 1, 400_000)
    observer = observe("percentile", [x], "uint8", False, percentile=99.5, bins=128)
    assert observer.result().hi == pytest.approx(0.995, abs=observer.hist.width / 4)


def test_percentile_matches_numpy_on_skewed_data():
    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 1, 100_000)
    observer = observe("percentile", np.array_split(x, 7), "uint8", False, percentile=99.0)
    hi = np.percentile(x.astype(np.float32), 99.0)
    r, width = observer.result(), observer.hist.width
    assert r.lo == pytest.approx(x.min()) and r.hi == pytest.approx(hi, abs=width)


@pytest.mark.parametrize("qtype, symmetric", MODES)
def test_entropy_and_mse_clip_outliers_on_laplace(qtype, symmetric):
    x = laplace_with_outliers()
    batches = np.array_split(x, 25)
    absmax = lambda r: max(-r.lo, r.hi)  # noqa: E731
    minmax = absmax(observe("minmax", batches, qtype, symmetric).result())
    # every outlier (|x| >= 50) clipped; uint8's searches run on the signed histogram, where each
    # keeps >= 256 of the ~1240 bins the data spans (41 units of 200), not 128 of ~620 of |x|
    limit = 0.25 if symmetric else 0.35
    assert absmax(observe("entropy", batches, qtype, symmetric).result()) < limit * minmax
    # squared error still weighs the ten outliers heavily: mse clips, but less
    assert absmax(observe("mse", batches, qtype, symmetric).result()) < 0.85 * minmax


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_keep_the_range_of_uniform_data(method, qtype, symmetric):
    rng = np.random.default_rng(6)
    batches = [rng.uniform(-1, 1, 10_000) for _ in range(10)]
    minmax = observe("minmax", batches, qtype, symmetric).result()
    r = observe(method, batches, qtype, symmetric).result()
    assert r.lo == pytest.approx(minmax.lo, abs=0.01) and r.hi == pytest.approx(minmax.hi, abs=0.01)


def test_entropy_on_relu_outputs_uses_the_full_unsigned_range():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.laplace(0, 1, 200_000), 0)
    x[:5] = 80.0
    batches = np.array_split(x, 10)
    unsigned = observe("entropy", batches, "uint8", False).result()  # 256 levels on [0, t]
    signed = observe("entropy", batches, "int8", True).result()  # 128 levels on [0, t]
    assert unsigned.lo == 0.0 and 5.0 < unsigned.hi < 20.0
    assert unsigned.hi > signed.hi  # twice the levels: less rounding, so it can afford more range


def test_kl_search_scores_a_spike_at_its_first_bin_as_its_neighbour():
    # bin 0 holds the point the grid represents exactly (0, or the kept end): scored as bin 1, a
    # uniform histogram under a spike there is uniform, and only keeping it all has KL 0
    hist = np.full(2048, 100.0)
    hist[0] = 1e6
    assert kl_threshold(hist, 256) == kl_threshold(hist, 128) == 2048
    # ppocr_cls's relu_2.tmp_0: 32 zeros, 32 sparse values; a candidate keeping none of them
    # (Q all zero once bin 0 is rewritten) scored -inf and clipped all 32
    sparse = np.zeros(1100)
    sparse[0], sparse[np.arange(300, 1100, 25)] = 32, 1
    assert sparse[1 : kl_threshold(sparse, 256)].any()


@pytest.mark.parametrize("qtype, symmetric", MODES)
def test_exact_zeros_do_not_move_the_entropy_range(qtype, symmetric):
    # ReLU outputs: u2netp's are 45-77 % zeros, which drove the search to a quarter of their
    # range (up to 12 % of values clipped). Zeros neither move the grid nor reach the search.
    rng = np.random.default_rng(5)
    x = np.abs(rng.laplace(0, 1, 100_000))
    x[:3] = 40.0
    plain = observe("entropy", [x], qtype, symmetric).result()
    relu = observe("entropy", [np.concatenate([x, np.zeros(150_000)])], qtype, symmetric).result()
    assert relu.hi == plain.hi and 5.0 < plain.hi < 40.0  # lo: the observed min, 0 with the zeros


def test_entropy_keeps_a_spike_at_the_short_end_and_the_long_side_whole():
    # speech_embedding's Maximum(x, -0.4): a spike at -0.4 folded onto |x| = 0.4 was scored as the
    # long side's; the asymmetric grid [-0.4, hi] represents it exactly. Uniform above: kept whole.
    rng = np.random.default_rng(4)
    x = np.concatenate([np.full(60_000, -0.4), rng.uniform(0, 10, 100_000)])
    r = observe("entropy", np.array_split(rng.permutation(x), 8), "uint8", False)
    assert r.result().lo == pytest.approx(-0.4) and r.result().hi > 9.9
    assert r.summary()["clipped_fraction"] < 0.001  # the spike is not clipped


@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.12, 0.32)])
def test_entropy_keeps_skewed_uniform_data_whole(lo, hi):
    # (0.12, 0.32): ppocr_cls's hardsigmoid_0.tmp_0, far from 0, once collapsed to [0.1195, 0.1197]
    rng = np.random.default_rng(3)
    r = observe("entropy", [rng.uniform(lo, hi, 50_000) for _ in range(4)], "uint8", False).result()
    assert r.lo == pytest.approx(lo, abs=0.0025 * (hi - lo)) and r.hi == pytest.approx(hi, abs=0.0025 * (hi - lo))


def kl_threshold_reference(hist, levels):
    """TensorRT's search written out bin by bin, with the same grouping and smoothing, and bin 0
    scored with bin 1's count (pytorch-quantization's `bins[0] = bins[1]`)."""
    n = int(np.flatnonzero(hist)[-1]) + 1
    if n <= levels:
        return n
    hist = hist.astype(float)
    hist[0] = hist[1]
    lowest = int(np.flatnonzero(hist[1:])[0]) + levels
    if n <= lowest:
        return n
    scores = {}
    for i in range(lowest, n + 1):
        p = hist[:i].astype(float)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        edges = (i * np.arange(levels + 1)) // levels
        for a, b in zip(edges[:-1], edges[1:]):
            used = p[a:b] > 0
            if used.any():
                q[a:b][used] = hist[a:b].sum() / used.sum()
        kept = hist[:i].sum()
        q = np.where((p > 0) & (q == 0), 1e-4 * kept, q)
        P, Q = p / p.sum(), q / kept
        scores[i] = sum(P[j] * np.log(P[j] / Q[j]) for j in range(i) if P[j] > 0)
    return min(scores, key=scores.get)


def test_vectorized_kl_search_matches_a_direct_implementation():
    rng = np.random.default_rng(13)
    for trial in range(12):
        hist = np.floor(rng.exponential(1.0, 90) * np.exp(-np.arange(90) / rng.uniform(5, 30)) * 40)
        hist[rng.integers(60, 90)] += 1  # a lone outlier, often beyond an empty stretch
        levels = int(rng.choice([4, 8, 16]))
        assert kl_threshold(hist, levels) == kl_threshold_reference(hist, levels), trial


def raw_squared_error(x, lo, hi, qtype, symmetric):
    scale, zero_point = scale_zero_point(lo, hi, qtype, symmetric)
    restored = dequantize(quantize(x, scale, zero_point, qtype), scale, zero_point)
    return float(np.mean((restored - x) ** 2))


@pytest.mark.parametrize("qtype, symmetric, relu", [("int8", True, False), ("uint8", False, True)])
def test_mse_is_near_the_brute_force_optimum(qtype, symmetric, relu):
    rng = np.random.default_rng(8)
    x = rng.laplace(0, 1, 50_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 30.0]
    if relu:
        x = np.maximum(x, 0)
    t = observe("mse", np.array_split(x, 5), qtype, symmetric).result()
    q = QTYPES[qtype]
    lo0, hi0 = (-np.abs(x).max(), np.abs(x).max()) if symmetric else (min(x.min(), 0), x.max())
    shrink = np.linspace(0.05, 1.0, 400)
    errors = [raw_squared_error(x, s * lo0, s * hi0, q, symmetric) for s in shrink]
    best = int(np.argmin(errors))
    assert max(-t.lo, t.hi) == pytest.approx(shrink[best] * max(-lo0, hi0), rel=0.1)
    assert raw_squared_error(x, t.lo, t.hi, q, symmetric) <= 1.03 * errors[best]
    assert raw_squared_error(x, t.lo, t.hi, q, symmetric) < errors[-1]  # better than minmax


def test_mse_matches_the_laplace_optimum_for_8_bits():
    # Banner et al. (ACIQ): for Laplace(b) and 8 bits the best clipping value is about 9.89 b.
    x = np.random.default_rng(9).laplace(0, 1, 1_000_000).astype(np.float32)
    r = observe("mse", np.array_split(x, 10), "int8", True).result()
    assert r.hi == pytest.approx(9.89, rel=0.05)


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_values_are_ignored(method, qtype, symmetric):
    rng = np.random.default_rng(10)
    clean = [rng.normal(0, 1, (4, 100)) for _ in range(5)]
    bad = np.array([np.nan, np.inf, -np.inf, -np.nan])
    dirty = [np.concatenate([b, np.broadcast_to(bad, (4, 4))], axis=1) for b in clean]
    expected = observe(method, clean, qtype, symmetric)
    got = observe(method, dirty, qtype, symmetric)
    assert got.result() == expected.result()
    assert np.isfinite([got.result().lo, got.result().hi]).all()


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_all_zero_and_empty_input(method, qtype, symmetric):
    zeros = observe(method, [np.zeros((4, 16)) for _ in range(3)], qtype, symmetric)
    assert zeros.result() == Range(0.0, 0.0)
    json.dumps(zeros.summary())
    nothing = observe(method, [np.full((2, 3), np.nan)], qtype, symmetric)
    assert nothing.result() == Range(0.0, 0.0)
    # zeros seen before any other value are still counted once a grid exists
    later = observe(method, [np.zeros(1000), np.ones(10)], qtype, symmetric)
    if method != "minmax":
        assert later.hist.total == 1010 and later.summary()["p50"] <= later.hist.width


@pytest.mark.parametrize("method", METHODS)
def test_summary_is_plain_json_with_percentiles_clipping_and_drift(method):
    rng = np.random.default_rng(11)
    batches = [rng.normal(0, 1, (10, 100)) for _ in range(20)]
    summary = observe(method, batches, percentile=99.0, expected=200).summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["samples"] == 200
    assert summary["range_drift_since"] == 180 and 0.0 <= summary["range_drift"] < 0.05
    if method == "minmax":
        assert summary["clipped_fraction"] == 0.0
        return
    assert 0.6 < summary["p50"] < 0.75  # median of |N(0, 1)| is 0.674
    assert summary["p99"] == pytest.approx(2.576, rel=0.02)
    assert summary["p50"] <= summary["p99"] <= summary["p99.9"] <= summary["p99.99"]
    if method == "percentile":
        assert summary["clipped_fraction"] == pytest.approx(0.01, abs=1e-3)


def test_drift_shows_a_range_still_moving_at_the_end():
    rng = np.random.default_rng(12)
    batches = [rng.normal(0, 1 if i < 19 else 3, (10, 100)) for i in range(20)]
    for method in METHODS:
        assert observe(method, batches, expected=200).summary()["range_drift"] > 0.2, method
    # without an expected total: drift since the last power of two (128 samples)
    summary = observe("percentile", batches).summary()
    assert summary["range_drift_since"] == 130 and summary["range_drift"] > 0.2


def test_minmax_moving_average_does_not_claim_a_clipped_fraction():
    observer = MinMaxObserver(CalibrationSpec(moving_average=0.9), QTYPES["int8"], True)
    observer.update(np.linspace(-1, 1, 10, dtype=np.float32))
    assert observer.summary()["clipped_fraction"] is None


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_one_signed_data_far_from_zero_never_gets_an_inverted_range(method, qtype, symmetric):
    # ppocr_cls's conv2d_56.tmp_1: every value in [-1.5, -0.88]; the KL search on |x| kept fewer bins
    # than lie below the data (all of it folded into one bin scores 0) and wrote lo -0.45 > hi -0.88,
    # a table qtool then refused to load
    rng = np.random.default_rng(8)
    batches = [-rng.uniform(0.88, 1.5, 10_000) for _ in range(4)]
    r = observe(method, batches, qtype, symmetric).result()
    assert r.lo <= r.hi and r.lo <= -0.88
