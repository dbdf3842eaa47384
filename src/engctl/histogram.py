"""Latency histograms with bounded memory: log-linear buckets over microseconds.

Values below 16 µs have a bucket each; above, every power of two is split into 8 buckets, so a
bucket is at most 12.5 % wide and a percentile read from it is within about 6 % of the truth.
256 buckets reach past 15 minutes; larger values land in the last one. Recording is a few
integer operations; histograms of one shape merge by adding counts.

Shared contract between daemon and CLI (the report merges stored histograms): stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

TYPE_CHECKING = False  # typing is not imported at run time (the CLI's report reads this)
if TYPE_CHECKING:
    from engctl.documents import LatencySummary

SUB_BITS = 3
SUB = 1 << SUB_BITS  # buckets per power of two
LINEAR = SUB * 2  # values below this have a bucket each
NBUCKETS = 256


def bucket_of(us: int) -> int:
    """The bucket index of a value in microseconds."""
    if us < LINEAR:
        return us if us > 0 else 0
    e = us.bit_length() - SUB_BITS - 1
    idx = e * SUB + (us >> e)
    return idx if idx < NBUCKETS else NBUCKETS - 1


def bucket_bounds(idx: int) -> tuple[int, int]:
    """[low, high) of a bucket, in microseconds."""
    if idx < LINEAR:
        return idx, idx + 1
    e = idx // SUB - 1
    m = idx % SUB + SUB
    return m << e, (m + 1) << e


# The counts of every histogram that has none yet: each instance has one, and most never see
# a request (services) or not yet: 2 KiB each that a list of its own would cost until then.
_NO_COUNTS: tuple[int, ...] = (0,) * NBUCKETS


class Histogram:
    """Counts per bucket plus exact count, sum and max."""

    __slots__ = ("count", "counts", "max_us", "sum_us")

    def __init__(self) -> None:
        # A list of its own from the first observation on (`record_ms`, `decode`, `from_counts`).
        self.counts: list[int] | tuple[int, ...] = _NO_COUNTS
        self.count = 0
        self.sum_us = 0
        self.max_us = 0

    def record_ms(self, ms: float) -> None:
        """Add one observation given in milliseconds."""
        us = int(ms * 1000.0)
        if us < LINEAR:
            idx = us if us > 0 else 0
        else:
            e = us.bit_length() - 4
            idx = e * SUB + (us >> e)
            if idx >= NBUCKETS:
                idx = NBUCKETS - 1
        counts = self.counts
        if not isinstance(counts, list):
            counts = self.counts = [0] * NBUCKETS
        counts[idx] += 1
        self.count += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    def copy(self) -> Histogram:
        h = Histogram()
        if self.count:
            h.counts = list(self.counts)
        h.count, h.sum_us, h.max_us = self.count, self.sum_us, self.max_us
        return h

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations added since `earlier` (a copy of this one, taken before).

        The max of the difference is the highest bucket's upper bound (clamped to this max):
        the exact max of a window is not kept.
        """
        h = Histogram()
        if self.count == earlier.count:
            return h  # none added (each bucket only grows): the roll-up of an idle instance
        h.counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        h.count = self.count - earlier.count
        h.sum_us = self.sum_us - earlier.sum_us
        top = next((i for i in range(NBUCKETS - 1, -1, -1) if h.counts[i] > 0), None)
        h.max_us = 0 if top is None else min(self.max_us, bucket_bounds(top)[1] - 1)
        return h

    def merge(self, other: Histogram) -> None:
        """Add another histogram's observations to this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, q: float) -> float | None:
        """The q-quantile (0 < q ≤ 1) in milliseconds, None when empty."""
        if self.count == 0:
            return None
        rank = max(1, int(q * self.count + 0.999999))
        seen = 0
        for idx, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                low, high = bucket_bounds(idx)
                # The middle of the bucket, but never above the largest value seen.
                return min((low + high - 1) / 2.0, float(self.max_us)) / 1000.0
        return self.max_us / 1000.0

    def count_from_ms(self, ms: float) -> int:
        """Observations at or above `ms`, each placed as `percentile_ms` places it (its
        bucket's middle, never above the largest value seen)."""
        total = 0
        for idx, n in enumerate(self.counts):
            if n:
                low, high = bucket_bounds(idx)
                if min((low + high - 1) / 2.0, float(self.max_us)) / 1000.0 >= ms:
                    total += n
        return total

    def mean_ms(self) -> float | None:
        return None if self.count == 0 else self.sum_us / self.count / 1000.0

    def summary(self) -> LatencySummary:
        """count, p50, p90, p99, max and mean in milliseconds (the report's figures)."""
        return {
            "count": self.count,
            "p50_ms": _r(self.percentile_ms(0.50)),
            "p90_ms": _r(self.percentile_ms(0.90)),
            "p99_ms": _r(self.percentile_ms(0.99)),
            "max_ms": _r(self.max_us / 1000.0) if self.count else None,
            "mean_ms": _r(self.mean_ms()),
        }

    def cumulative_at(self, bounds_us: Iterable[int]) -> Iterator[tuple[int, int]]:
        """(bound, observations below it) for ascending bucket-aligned bounds (Prometheus)."""
        seen = 0
        idx = 0
        for bound in bounds_us:
            while idx < NBUCKETS and bucket_bounds(idx)[1] <= bound:
                seen += self.counts[idx]
                idx += 1
            yield bound, seen

    # -- storage ------------------------------------------------------------------------
    def encode(self) -> str:
        """Compact text: "sum_us max_us idx:count,idx:count,..." of the non-empty buckets."""
        cells = ",".join(f"{i}:{n}" for i, n in enumerate(self.counts) if n)
        return f"{self.sum_us} {self.max_us} {cells}"

    @classmethod
    def decode(cls, text: str) -> Histogram:
        """The inverse of `encode`; raises ValueError on anything else."""
        h = cls()
        counts = h.counts = [0] * NBUCKETS
        parts = text.split(" ")
        if len(parts) != 3:
            raise ValueError(f"not an encoded histogram: {text[:40]!r}")
        h.sum_us = int(parts[0])
        h.max_us = int(parts[1])
        if parts[2]:
            for cell in parts[2].split(","):
                i, _, n = cell.partition(":")
                idx, k = int(i), int(n)
                if not 0 <= idx < NBUCKETS or k < 0:
                    raise ValueError(f"not an encoded histogram: {text[:40]!r}")
                counts[idx] += k
        h.count = sum(counts)
        return h

    @classmethod
    def from_list(cls, counts: list[int] | tuple[int, ...], sum_us: int = 0) -> Histogram:
        """A histogram over a copy of another's `counts` (its max is not known)."""
        h = cls()
        h.counts = counts
        h.count = sum(counts)
        h.sum_us = sum_us
        return h

    @classmethod
    def from_counts(cls, counts: Mapping[int, int], sum_us: int = 0, max_us: int = 0) -> Histogram:
        h = cls()
        own = h.counts = [0] * NBUCKETS
        for i, n in counts.items():
            own[i] += n
        h.count = sum(own)
        h.sum_us, h.max_us = sum_us, max_us
        return h


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
