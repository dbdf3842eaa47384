"""The log-linear latency histogram: bucket layout, percentiles within the documented error
against known distributions, storage encoding, merge and minus, and the cumulative counts
behind the Prometheus exposition."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.histogram import LINEAR, NBUCKETS, SUB, Histogram, bucket_bounds, bucket_of

# A bucket is at most 1/8 of its lower bound wide; its middle is within 1/16 of any value in it.
MAX_REL_ERROR = 1 / 16
LAST_LOW, LAST_HIGH = bucket_bounds(NBUCKETS - 1)
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)

# Latencies in whole microseconds, below the last bucket (where values are clamped).
micros = st.integers(min_value=0, max_value=LAST_LOW - 1)


def record_us(h: Histogram, us: int) -> None:
    """Record a whole number of microseconds (record_ms truncates: 1.001 ms * 1000.0 is
    1000.99…; half a microsecond more lands on the intended integer)."""
    h.record_ms((us + 0.5) / 1000.0)


def hist_us(values: list[int]) -> Histogram:
    """A histogram of whole-microsecond values (recorded in milliseconds, as the router does)."""
    h = Histogram()
    for us in values:
        record_us(h, us)
    return h


def recorded_us(ms: float) -> int:
    """The microseconds a millisecond reading is recorded as (truncated)."""
    return int(ms * 1000.0)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank definition the histogram approximates."""
    rank = max(1, math.ceil(q * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


def assert_close(estimate: float | None, truth: float, rel: float = MAX_REL_ERROR) -> None:
    # 1 µs of slack: readings are truncated to whole microseconds when recorded.
    assert estimate is not None
    assert abs(estimate - truth) <= rel * truth + 0.001, (estimate, truth)


# -- bucket layout ----------------------------------------------------------------------------


def test_buckets_are_contiguous_from_zero() -> None:
    """Each bucket starts where the previous one ends; the first starts at 0."""
    assert bucket_bounds(0) == (0, 1)
    for idx in range(1, NBUCKETS):
        assert bucket_bounds(idx)[0] == bucket_bounds(idx - 1)[1], idx


def test_buckets_are_at_most_one_eighth_wide() -> None:
    """Below LINEAR each value has its bucket; above, a bucket is ≤ 12.5 % of its low bound."""
    for idx in range(NBUCKETS):
        low, high = bucket_bounds(idx)
        assert high > low
        if idx < LINEAR:
            assert (low, high) == (idx, idx + 1)
        else:
            assert (high - low) / low <= 1 / SUB


def test_buckets_reach_past_fifteen_minutes() -> None:
    """The documented range: 256 buckets cover more than 15 minutes in microseconds."""
    assert LAST_HIGH > 15 * 60 * 1_000_000


def test_every_bucket_boundary_maps_to_its_bucket() -> None:
    """bucket_of is the inverse of bucket_bounds at both edges of every bucket."""
    for idx in range(NBUCKETS):
        low, high = bucket_bounds(idx)
        assert bucket_of(low) == idx
        assert bucket_of(high - 1) == idx


@given(micros)
def test_bucket_of_covers_every_value(us: int) -> None:
    """Every value below the last bucket's end falls inside the bounds of its bucket."""
    low, high = bucket_bounds(bucket_of(us))
    assert low <= us < high


@given(st.floats(min_value=0, max_value=LAST_LOW / 1000.0 - 1, allow_nan=False))
def test_record_ms_uses_the_same_bucket_as_bucket_of(ms: float) -> None:
    """record_ms's inlined bucket computation agrees with bucket_of."""
    h = Histogram()
    h.record_ms(ms)
    us = recorded_us(ms)
    assert h.counts[bucket_of(us)] == 1
    assert (h.count, h.sum_us, h.max_us) == (1, us, us)


def test_values_beyond_the_last_bucket_are_clamped_into_it() -> None:
    """A reading past the last bucket counts in the last one; max and sum stay exact."""
    assert bucket_of(LAST_HIGH) == NBUCKETS - 1
    assert bucket_of(10 * LAST_HIGH) == NBUCKETS - 1
    h = Histogram()
    huge_ms = 10 * LAST_HIGH / 1000.0
    h.record_ms(huge_ms)
    h.record_ms(1.0)
    assert h.counts[NBUCKETS - 1] == 1
    assert h.count == 2
    assert h.max_us == 10 * LAST_HIGH
    assert h.sum_us == 10 * LAST_HIGH + 1000
    # The top percentile never reports more than was seen.
    p100 = h.percentile_ms(1.0)
    assert p100 is not None and p100 <= huge_ms


# -- percentiles -------------------------------------------------------------------------------


def test_empty_histogram_has_no_percentiles() -> None:
    h = Histogram()
    for q in QUANTILES:
        assert h.percentile_ms(q) is None
    assert h.mean_ms() is None
    assert h.summary() == {
        "count": 0,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "max_ms": None,
        "mean_ms": None,
    }


@pytest.mark.parametrize("ms", [0.0, 0.005, 0.015, 0.5, 1.0, 3.7, 42.0, 999.0, 60_000.0])
def test_constant_latency(ms: float) -> None:
    """All readings equal: every percentile is that value within the bucket error, max exact."""
    h = Histogram()
    for _ in range(1000):
        h.record_ms(ms)
    truth = recorded_us(ms) / 1000.0
    for q in QUANTILES:
        p = h.percentile_ms(q)
        assert_close(p, truth)
        assert p is not None and p <= truth  # clamped to the max seen
    s = h.summary()
    assert s["count"] == 1000
    assert s["max_ms"] == round(truth, 3)
    assert s["mean_ms"] == round(truth, 3)


def test_small_values_are_exact() -> None:
    """Below 16 µs each microsecond is a bucket: percentiles are exact."""
    h = hist_us(list(range(16)) * 10)
    assert h.percentile_ms(0.5) == 0.007
    assert h.percentile_ms(1.0) == 0.015
    assert h.percentile_ms(0.01) == 0.0


def test_uniform_distribution() -> None:
    """Uniform 1-100 ms: quantiles within 1/16 of the sample's and of the distribution's."""
    rng = random.Random(7)
    values = [rng.uniform(1.0, 100.0) for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.record_ms(v)
    ordered = sorted(values)
    for q in QUANTILES:
        assert_close(h.percentile_ms(q), nearest_rank(ordered, q))
    for q in (0.5, 0.9, 0.99):
        # the theoretical quantile, with a little room for sampling noise
        assert_close(h.percentile_ms(q), 1.0 + 99.0 * q, rel=MAX_REL_ERROR + 0.02)
    assert h.max_us == recorded_us(max(values))
    mean = h.mean_ms()
    assert mean is not None and abs(mean - sum(values) / len(values)) < 0.01


def test_exponential_distribution() -> None:
    """Exponential with mean 5 ms: a long tail, still within 1/16 at every quantile."""
    rng = random.Random(11)
    values = [rng.expovariate(1 / 5.0) for _ in range(50_000)]
    h = Histogram()
    for v in values:
        h.record_ms(v)
    ordered = sorted(values)
    for q in QUANTILES:
        assert_close(h.percentile_ms(q), nearest_rank(ordered, q))
    for q in (0.5, 0.9, 0.99):
        theoretical = -5.0 * math.log(1.0 - q)
        assert_close(h.percentile_ms(q), theoretical, rel=MAX_REL_ERROR + 0.03)


def test_two_point_distribution() -> None:
    """90 % at 2 ms and 10 % at 200 ms: p50/p90 at the low point, p91 and up at the high one."""
    h = Histogram()
    for _ in range(900):
        h.record_ms(2.0)
    for _ in range(100):
        h.record_ms(200.0)
    assert_close(h.percentile_ms(0.5), 2.0)
    assert_close(h.percentile_ms(0.9), 2.0)
    assert_close(h.percentile_ms(0.901), 200.0)
    assert_close(h.percentile_ms(0.99), 200.0)
    assert h.percentile_ms(1.0) == 200.0
    s = h.summary()
    p50, p99 = s["p50_ms"], s["p99_ms"]
    assert p50 is not None and p99 is not None
    assert p50 < 3 < p99


@settings(max_examples=200, deadline=None)
@given(st.lists(micros, min_size=1, max_size=300), st.sampled_from(QUANTILES))
def test_any_percentile_within_the_documented_error(values: list[int], q: float) -> None:
    """Property: for any readings, the estimate is within 1/16 of the nearest-rank truth."""
    h = hist_us(values)
    truth_us = nearest_rank(sorted(values), q)
    p = h.percentile_ms(q)
    assert p is not None
    assert abs(p * 1000.0 - truth_us) <= MAX_REL_ERROR * truth_us + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.lists(micros, min_size=1, max_size=300))
def test_percentiles_are_monotone_and_capped_by_the_max(values: list[int]) -> None:
    """p(q) never decreases with q, and p100 ≤ max (exact); count and sum are exact."""
    h = hist_us(values)
    ps = [h.percentile_ms(q) for q in QUANTILES]
    assert all(p is not None for p in ps)
    assert ps == sorted(ps)  # type: ignore[type-var]
    p100 = h.percentile_ms(1.0)
    assert p100 is not None and p100 <= h.max_us / 1000.0
    assert h.max_us == max(values)
    assert h.count == len(values)
    assert h.sum_us == sum(values)


# -- storage, merge, minus ---------------------------------------------------------------------


def same(a: Histogram, b: Histogram) -> bool:
    # An empty histogram's counts may be the shared tuple, a decoded one's a list.
    return (list(a.counts), a.count, a.sum_us, a.max_us) == (
        list(b.counts),
        b.count,
        b.sum_us,
        b.max_us,
    )


@given(st.lists(st.integers(min_value=0, max_value=10 * LAST_HIGH), max_size=200))
def test_encode_decode_round_trip(values: list[int]) -> None:
    """decode(encode(h)) is h: counts, count, sum and max (also for clamped values)."""
    h = hist_us(values)
    text = h.encode()
    assert "\n" not in text
    back = Histogram.decode(text)
    assert same(back, h)
    assert back.encode() == text


def test_encoding_lists_only_non_empty_buckets() -> None:
    h = hist_us([3, 3, 1000])
    assert h.encode() == f"1006 1000 3:2,{bucket_of(1000)}:1"
    assert Histogram().encode() == "0 0 "
    assert same(Histogram.decode("0 0 "), Histogram())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "1 2",
        "1 2 3 4",
        "x 2 3:1",
        "1 2 3:y",
        "1 2 3;1",
        "1 2 999:1",
        "1 2 -1:1",
        "1 2 3:-1",
    ],
)
def test_decode_rejects_what_encode_never_writes(text: str) -> None:
    with pytest.raises(ValueError):
        Histogram.decode(text)


def test_from_counts_builds_the_same_histogram() -> None:
    h = hist_us([5, 700, 700, 90_000])
    built = Histogram.from_counts(
        {i: n for i, n in enumerate(h.counts) if n}, sum_us=h.sum_us, max_us=h.max_us
    )
    assert same(built, h)


@given(st.lists(micros, max_size=200), st.lists(micros, max_size=200))
def test_merge_equals_recording_both(a: list[int], b: list[int]) -> None:
    """Merging two histograms gives the histogram of both sets of readings, exactly."""
    ha, hb = hist_us(a), hist_us(b)
    ha.merge(hb)
    assert same(ha, hist_us(a + b))
    assert same(hb, hist_us(b))  # the argument is untouched


@given(st.lists(micros, max_size=200), st.lists(micros, max_size=200))
def test_minus_equals_recording_only_the_later_ones(before: list[int], after: list[int]) -> None:
    """h.minus(earlier copy) has the counts, count and sum of the later readings; its max is
    the window's max rounded up within the same bucket (never more than the overall max)."""
    h = hist_us(before)
    earlier = h.copy()
    for us in after:
        record_us(h, us)
    diff = h.minus(earlier)
    only = hist_us(after)
    assert diff.counts == only.counts
    assert (diff.count, diff.sum_us) == (only.count, only.sum_us)
    if after:
        assert only.max_us <= diff.max_us <= h.max_us
        assert bucket_of(diff.max_us) == bucket_of(only.max_us)
    else:
        assert diff.max_us == 0
        assert diff.percentile_ms(0.5) is None
    # the copy is independent of later recording
    assert same(earlier, hist_us(before))


def test_minus_of_an_unchanged_histogram_is_empty() -> None:
    h = hist_us([10, 20, 30_000])
    d = h.minus(h.copy())
    assert d.count == 0 and d.sum_us == 0 and d.max_us == 0
    assert d.encode() == "0 0 "


# -- cumulative counts (Prometheus) -------------------------------------------------------------

PROM_LIKE = [1 << k for k in range(4, 27)]  # powers of two are bucket edges


def test_power_of_two_bounds_are_bucket_edges() -> None:
    edges = {bucket_bounds(i)[0] for i in range(NBUCKETS)}
    assert set(PROM_LIKE) <= edges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 27), max_size=300))
def test_cumulative_at_is_exact_at_bucket_edges(values: list[int]) -> None:
    """At bucket-aligned bounds the cumulative count is exactly the readings below the bound."""
    h = hist_us(values)
    got = list(h.cumulative_at(PROM_LIKE))
    assert [b for b, _ in got] == PROM_LIKE
    for bound, n in got:
        assert n == sum(1 for v in values if v < bound), bound
    counts = [n for _, n in got]
    assert counts == sorted(counts)


def test_cumulative_at_arbitrary_edges_and_past_the_end() -> None:
    """Any bucket edges work (not only powers of two); a bound past the last bucket counts
    everything, clamped readings included."""
    edges = [bucket_bounds(i)[0] for i in (1, 17, 40, 100, 200)]
    values = [0, 1, 17, 18, 19, 5000, 5001, 2_000_000, 10 * LAST_HIGH]
    h = hist_us(values)
    for bound, n in h.cumulative_at(edges):
        assert n == sum(1 for v in values if v < bound)
    assert list(h.cumulative_at([LAST_HIGH])) == [(LAST_HIGH, len(values))]
    assert list(h.cumulative_at([])) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["record", "copy", "decode", "from_counts", "merge"]), max_size=8))
def test_histograms_without_observations_share_no_counts_they_change(ops: list[str]) -> None:
    """Issue 13 (memory): a histogram holds no counts of its own until its first observation
    (2 KiB for each idle instance before); whatever is done to others, a new one counts from
    zero and its copies stay apart from it."""
    made: list[Histogram] = []
    for op in ops:
        h = Histogram()
        if op == "record":
            h.record_ms(1.5)
        elif op == "copy":
            c = h.copy()
            h.record_ms(3.0)
            assert c.count == 0 and sum(c.counts) == 0
        elif op == "decode":
            h = Histogram.decode("5 5 3:2")
        elif op == "from_counts":
            h = Histogram.from_counts({7: 4})
        else:
            h.merge(Histogram.from_counts({9: 1}))
        made.append(h)
    fresh = Histogram()
    assert fresh.count == 0 and sum(fresh.counts) == 0 and len(fresh.counts) == NBUCKETS
    assert not isinstance(fresh.counts, list)  # shared, read-only until an observation
    for h in made:
        assert sum(h.counts) == h.count
