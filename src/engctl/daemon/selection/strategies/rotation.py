"""Strategies that take turns: round robin and nginx's smooth weighted round robin.

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import ClassVar

from engctl.protocol import StrategyName

from ..candidates import Candidate, CandidateSet, Change, _take_turn
from ..selector import Selector
from .base import Verdict, _load_note, _WeightedState


class _Cursor:
    """Round robin's position: the order key of the last pick."""

    __slots__ = ("last",)

    def __init__(self, _: CandidateSet) -> None:
        self.last = -1

    def added(self, candidate: Candidate) -> None:
        pass

    def removed(self, candidate: Candidate) -> None:
        pass

    def changed(self, candidate: Candidate, change: Change) -> None:
        pass


class RoundRobin:
    """Each free member in turn, skipping full ones; O(log n) via the set's free list.

    A downweighted member takes its turns in proportion to its effective over configured
    weight (0.25: one turn in four; the others pass to the next member), so the slow policy
    acts here too; at full weight every member takes every turn, as plain round robin. When
    `walk` turns pass without a taker (every member far below its weight), the one with the
    most credit takes it.
    """

    name: ClassVar[StrategyName] = StrategyName.ROUND_ROBIN

    def __init__(self, *, walk: int = 64) -> None:
        self.walk = walk

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        free_seqs = candidates._free_seqs
        if not free_seqs:
            return None
        cur = candidates.attach(self, _Cursor)
        # The cursor is an order key, not an index, so joins and leaves do not skip anyone.
        i = bisect_right(free_seqs, cur.last)
        if i == len(free_seqs):
            i = 0
        c = candidates._free[i]
        if c._share < 1.0:
            c = self._turn_from(candidates._free, i)
        cur.last = c._seq
        return c

    def _turn_from(self, free: Sequence[Candidate], i: int) -> Candidate:
        """The first member from position `i` on that takes its turn."""
        n = len(free)
        c = best = free[i]
        for _ in range(self.walk):
            if c._share >= 1.0 or _take_turn(c):
                return c
            if c._credit > best._credit:
                best = c
            i += 1
            if i == n:
                i = 0
            c = free[i]
        best._credit -= 1.0
        return best

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        members = candidates._members
        notes: dict[str, str] = {}
        start = 0 if winner is None else members.index(winner)
        for k in range(len(members)):
            c = members[(start + k) % len(members)]
            share = f", takes {c._share:.0%} of its turns" if c._share < 1.0 else ""
            if c._in_flight >= c._max:
                notes[c._id] = f"rr: {_load_note(c)}, skipped"
            elif c is winner:
                notes[c._id] = f"rr cursor: this turn{share}"
            else:
                notes[c._id] = f"rr cursor: turn +{k}{share}"
        why = "nothing free" if winner is None else "next free member in rotation order"
        return Verdict(why, notes)


def quantize_weights(
    weights: Sequence[float],
    *,
    resolution: int = 100,
    max_cycle: int = 65_536,
    budget: int = 400_000,
) -> list[int]:
    """Integer weights for a smooth schedule: exact to 1/`resolution`, divided by their gcd.

    When the cycle (their sum) would exceed `max_cycle`, or building it (cycle × distinct
    weights) would exceed `budget` steps, the resolution is halved until it fits, so a rebuild
    after a weight change stays in the milliseconds. A positive weight never rounds to zero.
    """
    res = float(resolution)
    n_positive = sum(1 for w in weights if w > 0)
    while True:
        q = [max(1, round(w * res)) if w > 0 else 0 for w in weights]
        positive = [x for x in q if x > 0]
        if not positive:
            return q
        g = math.gcd(*positive)
        q = [x // g for x in q]
        cycle = sum(q)
        distinct = len(set(positive))
        if cycle <= n_positive or (
            cycle <= max(max_cycle, n_positive) and cycle * distinct <= budget
        ):
            return q
        res /= 2


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """Indices in the order nginx's smooth weighted round robin picks them over one cycle.

    nginx adds each weight to a current value, picks the highest (first on ties) and takes the
    total from it. Members of equal weight then take turns in list order, so simulating one
    representative per distinct weight gives the same sequence in O(cycle × distinct weights)
    instead of O(cycle × members).
    """
    groups: dict[int, list[int]] = {}
    for i, w in enumerate(weights):
        if w > 0:
            groups.setdefault(w, []).append(i)
    classes = list(groups.items())
    total = sum(w for w in weights if w > 0)
    picks = [0] * len(classes)
    out: list[int] = []
    for t in range(1, total + 1):
        best = -1
        best_value = 0
        best_index = 0
        for j, (w, members) in enumerate(classes):
            m = len(members)
            p = picks[j]
            # Current value of the class's next member after t rounds of additions.
            value = t * w - total * (p // m)
            index = members[p % m]
            if best < 0 or value > best_value or (value == best_value and index < best_index):
                best, best_value, best_index = j, value, index
        out.append(best_index)
        picks[best] += 1
    return out


class _Schedule(_WeightedState):
    """A precomputed smooth cycle, rebuilt lazily only after membership or weights change."""

    __slots__ = ("cursor", "slots", "slots_of")

    def __init__(self, _: CandidateSet) -> None:
        super().__init__()
        self.slots: list[Candidate] = []
        self.slots_of: dict[str, int] = {}
        self.cursor = 0

    def rebuild(self, candidates: CandidateSet, owner: SmoothWeightedRoundRobin) -> None:
        members = candidates._members
        q = quantize_weights(
            [c._effective_weight for c in members],
            resolution=owner.resolution,
            max_cycle=owner.max_cycle,
        )
        self.slots = [members[i] for i in smooth_schedule(q)]
        self.slots_of = {c._id: n for c, n in zip(members, q, strict=True)}
        self.cursor = 0
        self.dirty = False


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin from a precomputed cycle: exact shares per cycle,
    interleaved (5,1,1 gives a a b a c a a). A full member loses its turn; when a short walk
    finds nothing free (saturation), the free member of highest weight is taken. Members of
    effective weight 0 are picked only when no weighted member is free."""

    name: ClassVar[StrategyName] = StrategyName.WEIGHTED_ROUND_ROBIN

    def __init__(self, *, resolution: int = 100, max_cycle: int = 65_536, walk: int = 64) -> None:
        self.resolution = resolution
        self.max_cycle = max_cycle
        self.walk = walk

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        if not candidates._free:
            return None
        sched = candidates.attach(self, _Schedule)
        if sched.dirty:
            sched.rebuild(candidates, self)
        slots = sched.slots
        n = len(slots)
        cursor = sched.cursor
        for _ in range(min(n, self.walk)):
            c = slots[cursor]
            cursor += 1
            if cursor == n:
                cursor = 0
            if c._in_flight < c._max:
                sched.cursor = cursor
                return c
        sched.cursor = cursor
        return max(candidates._free, key=lambda c: (c._effective_weight, -c._seq))

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        sched = candidates.attach(self, _Schedule)
        if sched.dirty:
            sched.rebuild(candidates, self)
        cycle = len(sched.slots)
        notes = {}
        for c in candidates._members:
            share = f"weight {c._effective_weight:g}: {sched.slots_of.get(c._id, 0)}/{cycle} slots"
            full = c._in_flight >= c._max
            notes[c._id] = f"{share}, {_load_note(c)}" + (", turn lost" if full else "")
        if winner is None:
            why = "nothing free"
        else:
            why = f"its slot came up in the smooth cycle of {cycle} (free members take turns)"
        return Verdict(why, notes)
