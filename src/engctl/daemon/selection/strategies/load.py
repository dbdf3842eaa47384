"""Strategies by load and weight: least loaded (power of two choices at scale) and weighted
random.

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from typing import ClassVar

from engctl.protocol import StrategyName

from ..candidates import Candidate, CandidateSet
from ..selector import Selector
from .base import Verdict, _load_note, _WeightedState


def _load_key(c: Candidate) -> float:
    """In flight per unit of capacity and effective weight (Envoy's weighted least request:
    active requests over weight); a member of weight 0 is last."""
    w = c._effective_weight
    return c._in_flight / (c._max * w) if w > 0 else math.inf


def _weighted_note(c: Candidate) -> str:
    note = _load_note(c)
    return note if c._effective_weight == 1.0 else f"{note}, weight {c._effective_weight:g}"


class LeastLoaded:
    """Weighted least request: fewest in flight per unit of max_concurrency and effective
    weight (Envoy's active requests over weight; seed 000's weighted least connections).

    Among equal loads (an idle fleet) the earliest virtual deadline wins, and a pick moves the
    winner's deadline 1/weight on (earliest deadline first), so idle picks are shared in
    proportion to effective weight: a member downweighted to 0.25 gets a quarter of a full
    member's share, loaded or not. Small sets are scanned. Above `sample_above` members, the
    power of two choices: two members drawn in proportion to effective weight, the less loaded
    wins (the first drawn on a tie); it keeps the maximum load low without a scan.
    """

    name: ClassVar[StrategyName] = StrategyName.LEAST_LOADED
    # The virtual time of the deadlines, shared by every instance of the strategy (the key
    # strategies' fallbacks too): a candidate has one deadline, whichever object picks it.
    _now: ClassVar[float] = 0.0

    def __init__(
        self, rng: random.Random | None = None, *, sample_above: int = 16, redraws: int = 8
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.sample_above = sample_above
        self.redraws = redraws

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        free = candidates._free
        n = len(free)
        if n == 0:
            return None
        state = candidates.attach(self, _LoadState)
        if len(candidates._members) <= self.sample_above:
            return self._scan(free, state)
        if n == 1:
            state.sampled = (free[0],)
            return free[0]
        if state.dirty:
            state.rebuild(candidates)
        a = b = None
        total = state.total
        # With most members full the draws would mostly land on them: then (and with nothing
        # weighted) two free members at random; load decides there anyway.
        if total > 0 and 2 * n >= len(candidates._members):
            cum, owners, rnd = state.cum, state.owners, self._rng.random
            last = len(cum) - 1
            for _ in range(self.redraws):
                i = bisect_right(cum, rnd() * total)
                c = owners[i if i <= last else last]
                if c._in_flight < c._max:
                    if a is None:
                        a = c
                    elif c is not a:
                        b = c
                        break
        if a is None or b is None:
            rng = self._rng
            i = rng.randrange(n)
            j = rng.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = free[i], free[j]
        state.sampled = (a, b)
        return a if _load_key(a) <= _load_key(b) else b

    def _scan(self, free: Sequence[Candidate], state: _LoadState) -> Candidate:
        now = LeastLoaded._now
        best = free[0]
        best_key = math.inf
        best_vt = math.inf
        for c in free:
            w = c._effective_weight
            key = c._in_flight / (c._max * w) if w > 0 else math.inf
            vt = c._vt
            if vt < 0.0:  # first seen: its first deadline is one step from now
                vt = c._vt = now + (1.0 / w if w > 0 else 1.0)
            if key < best_key or (key == best_key and vt < best_vt):
                best, best_key, best_vt = c, key, vt
        # Time moves to the winner's deadline (not back: a member that was full or away for a
        # while is picked once, then rejoins the schedule without a burst of catch-up picks).
        if best_vt > now:
            now = LeastLoaded._now = best_vt
        w = best._effective_weight
        best._vt = now + (1.0 / w if w > 0 else 1.0)
        state.sampled = ()
        return best

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        state = candidates.attach(self, _LoadState)
        # The trace belongs to this request's pick only if there was one.
        sampled = {c._id for c in state.sampled} if winner is not None else set()
        notes = {}
        for c in candidates._members:
            extra = ", sampled" if c._id in sampled else ""
            notes[c._id] = _weighted_note(c) + extra
        if winner is None:
            why = "nothing free"
        elif len(state.sampled) == 2:
            other = state.sampled[1] if state.sampled[0] is winner else state.sampled[0]
            why = (
                f"power of two choices: {_weighted_note(winner)} beat {other._id}"
                f" ({_weighted_note(other)})"
            )
        else:
            why = f"least loaded of {len(candidates._free)} free members ({_weighted_note(winner)})"
        return Verdict(why, notes)


class _Cumulative(_WeightedState):
    """Cumulative effective weights for a binary-search draw, rebuilt when weights change."""

    __slots__ = ("cum", "owners", "total")

    def __init__(self, _: CandidateSet) -> None:
        super().__init__()
        self.cum: list[float] = []
        self.owners: list[Candidate] = []
        self.total = 0.0

    def rebuild(self, candidates: CandidateSet) -> None:
        self.owners = [c for c in candidates._members if c._effective_weight > 0]
        self.cum = list(itertools.accumulate(c._effective_weight for c in self.owners))
        self.total = self.cum[-1] if self.cum else 0.0
        self.dirty = False


class _LoadState(_Cumulative):
    """least_loaded's state for a set: the weighted draw of the power of two choices, and the
    members the last pick compared (for `--explain`)."""

    __slots__ = ("sampled",)

    def __init__(self, candidates: CandidateSet) -> None:
        super().__init__(candidates)
        self.sampled: tuple[Candidate, ...] = ()


class WeightedRandom:
    """A random member with probability proportional to its effective weight.

    A draw that lands on a full member is redrawn a few times, then the draw is made over the
    free members only (rare: the set is nearly saturated). Members of effective weight 0 are
    picked only when no weighted member is free.
    """

    name: ClassVar[StrategyName] = StrategyName.WEIGHTED_RANDOM

    def __init__(self, rng: random.Random | None = None, *, redraws: int = 8) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.redraws = redraws

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        free = candidates._free
        if not free:
            return None
        st = candidates.attach(self, _Cumulative)
        if st.dirty:
            st.rebuild(candidates)
        rng = self._rng
        if st.total > 0:
            cum, owners, last = st.cum, st.owners, len(st.cum) - 1
            for _ in range(self.redraws):
                i = bisect_right(cum, rng.random() * st.total)
                c = owners[i if i <= last else last]
                if c._in_flight < c._max:
                    return c
        weighted = [c for c in free if c._effective_weight > 0]
        if not weighted:
            return rng.choice(free)
        r = rng.random() * sum(c._effective_weight for c in weighted)
        for c in weighted:
            r -= c._effective_weight
            if r < 0:
                return c
        return weighted[-1]

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        total = sum(c._effective_weight for c in candidates._members)
        notes = {}
        for c in candidates._members:
            p = c._effective_weight / total if total > 0 else 0.0
            notes[c._id] = f"weight {c._effective_weight:g} (p={p:.3f}), {_load_note(c)}"
        if winner is None:
            why = "nothing free"
        else:
            p = winner._effective_weight / total if total > 0 else 0.0
            why = f"drawn at random in proportion to effective weight (p={p:.3f})"
        return Verdict(why, notes)
