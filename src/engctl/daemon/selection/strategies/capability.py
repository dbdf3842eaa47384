"""The scored strategy (`capability`): type, capability match, load, performance and affinity,
weighted (`CapabilityWeights`), times the effective weight; an index keeps a pick to one score
per group of alike members.

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping
from typing import ClassVar

from engctl.config import CAPABILITY_FACTORS, CapabilityWeights
from engctl.protocol import StrategyName

from ..candidates import Candidate, CandidateSet, Change
from ..selector import Selector
from .base import Verdict, _load_note


def capability_match(capabilities: frozenset[str], prefer: frozenset[str]) -> float:
    """Matched preferred capabilities over requested; 1.0 when nothing is preferred."""
    if not prefer:
        return 1.0
    return len(prefer & capabilities) / len(prefer)


def performance_factor(latency_ms: float | None, best_ms: float | None) -> float:
    """Inverse latency normalised to the fastest member (1.0); unmeasured counts as fastest,
    so a new instance gets the traffic that measures it."""
    if latency_ms is None or best_ms is None or latency_ms <= best_ms:
        return 1.0
    return best_ms / latency_ms


def _latency_key(c: Candidate) -> float:
    # Unmeasured sorts first: it scores as the fastest.
    return -1.0 if c._latency_ms is None else c._latency_ms


class _Bucket:
    __slots__ = ("heap", "live")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, Candidate]] = []
        self.live = 0


_BucketKey = tuple[float, frozenset[str], int, int]


class _ScoreIndex:
    """Members grouped by everything that scores them except latency (effective weight,
    capabilities, max_concurrency, in flight), each group a heap by latency.

    Within a group the fastest member has the best score, so a pick scores one member per
    group (a handful) instead of every member. Stale heap entries are skipped by token and
    compacted when they outnumber live ones. A second heap gives the fastest latency in the
    set, which normalises the performance factor.
    """

    __slots__ = ("_buckets", "_lat_token", "_latencies", "_tokens", "_where")

    def __init__(self, candidates: CandidateSet) -> None:
        self._buckets: dict[_BucketKey, _Bucket] = {}
        self._where: dict[Candidate, tuple[_BucketKey, int]] = {}
        self._latencies: list[tuple[float, int, int, Candidate]] = []
        self._lat_token: dict[Candidate, int] = {}
        self._tokens = itertools.count()
        for c in candidates._members:
            self.added(c)

    def added(self, candidate: Candidate) -> None:
        self._place(candidate)
        self._place_latency(candidate)

    def removed(self, candidate: Candidate) -> None:
        self._unplace(candidate)
        self._lat_token.pop(candidate, None)

    def changed(self, candidate: Candidate, change: Change) -> None:
        self._unplace(candidate)
        self._place(candidate)
        if change is Change.LATENCY:
            self._place_latency(candidate)

    def _place(self, c: Candidate) -> None:
        key = (c._effective_weight, c._capabilities, c._max, c._in_flight)
        token = next(self._tokens)
        self._where[c] = (key, token)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
        bucket.live += 1
        heapq.heappush(bucket.heap, (_latency_key(c), c._seq, token, c))
        if len(bucket.heap) > 2 * bucket.live + 16:
            where = self._where
            bucket.heap = [e for e in bucket.heap if where.get(e[3], (key, -1))[1] == e[2]]
            heapq.heapify(bucket.heap)

    def _unplace(self, c: Candidate) -> None:
        key, _ = self._where.pop(c)
        bucket = self._buckets[key]
        bucket.live -= 1
        if bucket.live == 0:
            del self._buckets[key]

    def _place_latency(self, c: Candidate) -> None:
        if c._latency_ms is None:
            self._lat_token.pop(c, None)
            return
        token = next(self._tokens)
        self._lat_token[c] = token
        heapq.heappush(self._latencies, (c._latency_ms, c._seq, token, c))
        if len(self._latencies) > 2 * len(self._lat_token) + 16:
            live = self._lat_token
            self._latencies = [e for e in self._latencies if live.get(e[3]) == e[2]]
            heapq.heapify(self._latencies)

    def best_latency(self) -> float | None:
        heap, live = self._latencies, self._lat_token
        while heap:
            lat, _, token, c = heap[0]
            if live.get(c) == token:
                return lat
            heapq.heappop(heap)
        return None

    def representatives(self) -> Iterator[Candidate]:
        """The fastest member of every group below max_concurrency."""
        where = self._where
        for (_, _, limit, in_flight), bucket in self._buckets.items():
            if in_flight >= limit:
                continue
            heap = bucket.heap
            while heap:
                entry = heap[0]
                placed = where.get(entry[3])
                if placed is not None and placed[1] == entry[2]:
                    yield entry[3]
                    break
                heapq.heappop(heap)


class Capability:
    """The scored strategy: type 40 %, capability match 25 %, load 20 %, performance 10 %,
    affinity 5 % (weights configurable), times the effective weight; the best score wins,
    ties go to the faster, then to the earlier member.

    `pick` scores one member per group of the index; `describe` (and `rank`) score every
    member, and both agree by construction: the tests check it.
    """

    name: ClassVar[StrategyName] = StrategyName.CAPABILITY

    def __init__(self, weights: CapabilityWeights | None = None) -> None:
        self.weights = weights if weights is not None else CapabilityWeights()
        self._matches: dict[tuple[frozenset[str], frozenset[str]], float] = {}

    def _match(self, caps: frozenset[str], prefer: frozenset[str]) -> float:
        cached = self._matches.get((caps, prefer))
        if cached is None:
            if len(self._matches) > 4096:  # user-supplied prefer sets must not grow it forever
                self._matches.clear()
            cached = self._matches[(caps, prefer)] = capability_match(caps, prefer)
        return cached

    def factors(
        self, c: Candidate, prefer: frozenset[str], best_ms: float | None, affine: bool
    ) -> tuple[float, float, float, float, float]:
        """The five factor values of one member, in CAPABILITY_FACTORS order."""
        return (
            1.0,
            self._match(c._capabilities, prefer),
            (c._max - c._in_flight) / c._max,
            performance_factor(c._latency_ms, best_ms),
            1.0 if affine else 0.0,
        )

    def score(self, c: Candidate, f: tuple[float, float, float, float, float]) -> float:
        w = self.weights
        return c._effective_weight * (
            w.type * f[0]
            + w.capability * f[1]
            + w.load * f[2]
            + w.performance * f[3]
            + w.affinity * f[4]
        )

    def _rank(
        self, c: Candidate, prefer: frozenset[str], best_ms: float | None, affine_id: str | None
    ) -> tuple[float, float, int]:
        f = self.factors(c, prefer, best_ms, c._id == affine_id)
        return (self.score(c, f), -_latency_key(c), -c._seq)

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        if not candidates._free:
            return None
        index = candidates.attach(self, _ScoreIndex)
        best_ms = index.best_latency()
        affine_id = candidates.memory.get(selector.key) if selector.key is not None else None
        prefer = selector.prefer
        best: Candidate | None = None
        best_rank: tuple[float, float, int] = (-1.0, 0.0, 0)
        for c in index.representatives():
            rank = self._rank(c, prefer, best_ms, affine_id)
            if best is None or rank > best_rank:
                best, best_rank = c, rank
        if affine_id is not None:
            # The affinity bonus belongs to one member, which need not lead its group.
            a = candidates._by_id.get(affine_id)
            if a is not None and a._in_flight < a._max:
                rank = self._rank(a, prefer, best_ms, affine_id)
                if best is None or rank > best_rank:
                    best = a
        return best

    def rank(
        self, candidates: CandidateSet, selector: Selector
    ) -> list[tuple[Candidate, dict[str, float], float]]:
        """Every member with its factors and score, best first (full members last)."""
        known = [c._latency_ms for c in candidates._members if c._latency_ms is not None]
        best_ms = min(known) if known else None
        affine_id = candidates.memory.get(selector.key) if selector.key is not None else None
        rows = []
        for c in candidates._members:
            f = self.factors(c, selector.prefer, best_ms, c._id == affine_id)
            order = (c._in_flight < c._max, self.score(c, f), -_latency_key(c), -c._seq)
            rows.append((order, c, dict(zip(CAPABILITY_FACTORS, f, strict=True)), self.score(c, f)))
        rows.sort(key=lambda r: r[0], reverse=True)
        return [(c, factors, score) for _, c, factors, score in rows]

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        rows = self.rank(candidates, selector)
        notes: dict[str, str] = {}
        factors: dict[str, Mapping[str, float]] = {}
        scores: dict[str, float] = {}
        for c, f, s in rows:
            weight = f"x weight {c._effective_weight:g}"
            notes[c._id] = f"score {s:.3f} ({weight}), {_load_note(c)}"
            factors[c._id] = f
            scores[c._id] = s
        if winner is None:
            return Verdict("nothing free", notes, factors, scores)
        runners = [(c, s) for c, _, s in rows if c is not winner and c._in_flight < c._max]
        why = f"highest score {scores[winner._id]:.3f}"
        if runners:
            why += f" (next: {runners[0][0]._id} {runners[0][1]:.3f})"
        return Verdict(why, notes, factors, scores)
