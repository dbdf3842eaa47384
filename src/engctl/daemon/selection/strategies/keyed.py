"""Strategies by request key (`--key`): affinity (sticky, with a fallback) and a consistent-hash
ring with bounded load.

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import ClassVar

from engctl.protocol import StrategyName

try:
    # CPython's own implementations of these digests: `hashlib` would load OpenSSL for the
    # same values, some 3.5 MiB of the daemon's RSS.
    from _blake2 import blake2b
    from _sha3 import shake_128  # type: ignore[import-not-found]  # typeshed has no stub
except ImportError:  # another interpreter
    from hashlib import blake2b, shake_128

from ..candidates import Candidate, CandidateSet, Change, Clock, KeyMemory, _take_turn
from ..selector import Selector
from .base import Strategy, Verdict, _load_note
from .load import LeastLoaded


class Affinity:
    """Sticky by `--key`: a key keeps going to its home instance while that one is eligible.

    When the home is ineligible (or gone, or outside this selector's filters) the key moves to
    the fallback's pick and sticks there; when the home is merely full, that one request
    overflows to the fallback and the key stays home, since fullness passes in milliseconds.
    A downweighted home keeps its keys' requests in proportion to its effective over
    configured weight (0.25: one in four); the others overflow the same way, and the key
    stays home so it comes back in full when the weight does. Without a key it is the
    fallback (least loaded by default).
    """

    name: ClassVar[StrategyName] = StrategyName.AFFINITY

    def __init__(
        self,
        fallback: Strategy | None = None,
        *,
        rng: random.Random | None = None,
        homes: KeyMemory | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.fallback: Strategy = fallback if fallback is not None else LeastLoaded(rng)
        self.homes = homes if homes is not None else KeyMemory(clock=clock)
        self._trace: tuple[str, str | None] = ("", None)

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        key = selector.key
        if key is None:
            self._trace = ("no key", None)
            return self.fallback.pick(candidates, selector)
        home_id = self.homes.get(key)
        home = candidates._by_id.get(home_id) if home_id is not None else None
        if home is not None:
            if home._in_flight < home._max:
                if home._share >= 1.0 or _take_turn(home):
                    self._trace = ("sticky", home_id)
                    self.homes.put(key, home._id)  # refresh, so a busy key never expires
                    return home
                self._trace = ("downweighted", home_id)
            else:
                self._trace = ("overflow", home_id)
            return self.fallback.pick(candidates, selector)
        c = self.fallback.pick(candidates, selector)
        if c is not None:
            self.homes.put(key, c._id)
        self._trace = ("moved" if home_id is not None else "new", home_id)
        return c

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        how, home_id = self._trace
        home_now = self.homes.get(selector.key) if selector.key is not None else None
        notes = {}
        for c in candidates._members:
            tag = f"home of key {selector.key!r}, " if c._id == home_now else ""
            notes[c._id] = tag + _load_note(c)
        if winner is None:
            why = "nothing free"
        elif how == "sticky":
            why = f"home of key {selector.key!r}"
        elif how == "overflow":
            why = f"home {home_id} is full; this request overflows to {self.fallback.name}"
        elif how == "downweighted":
            home = candidates._by_id.get(home_id or "")
            share = f" (takes {home._share:.0%} of its keys' requests)" if home else ""
            why = (
                f"home {home_id} is downweighted{share}; this request overflows to"
                f" {self.fallback.name}"
            )
        elif how == "moved":
            why = f"home {home_id} is not eligible here; the key re-sticks to the new pick"
        elif how == "new":
            why = f"new key: sticks to the {self.fallback.name} pick"
        else:
            why = f"no key: {self.fallback.name}"
        return Verdict(why, notes)


def ring_hash(text: str) -> int:
    """Where a key falls on the ring: a stable 30-bit hash.

    30 bits keep ring points single-digit ints, which CPython sorts and compares on a fast
    path; 64k points in 2**30 positions collide about twice, and a collision only orders two
    points by member.
    """
    return int.from_bytes(blake2b(text.encode(), digest_size=4).digest(), "big") >> 2


def ring_points(instance_id: str, vnodes: int) -> list[int]:
    """An instance's `vnodes` ring points, stable across processes.

    One extendable-output hash gives them all: a thousand instances hash in milliseconds,
    where one digest per point took a large fraction of a second.
    """
    raw = shake_128(instance_id.encode()).digest(4 * vnodes)
    return [x >> 2 for x in struct.unpack(f">{vnodes}I", raw)]


class _Ring:
    """Virtual-node points of the members, sorted, updated in place as members come and go."""

    __slots__ = ("owners", "points", "points_for")

    def __init__(self, candidates: CandidateSet, points_for: Callable[[str], list[int]]) -> None:
        self.points_for = points_for
        members = candidates._members
        flat: list[int] = []
        owner_of: list[Candidate] = []
        for c in members:
            pts = points_for(c._id)
            flat.extend(pts)
            owner_of.extend(itertools.repeat(c, len(pts)))
        # An index sort of small ints beats sorting tuples several times over; being stable,
        # it leaves colliding points in member order.
        order = sorted(range(len(flat)), key=flat.__getitem__)
        self.points = [flat[i] for i in order]
        self.owners = [owner_of[i] for i in order]

    def added(self, candidate: Candidate) -> None:
        points, owners, seq = self.points, self.owners, candidate._seq
        for p in self.points_for(candidate._id):
            i = bisect_left(points, p)
            # Colliding points stay in member order, so the ring equals a fresh build.
            while i < len(points) and points[i] == p and owners[i]._seq < seq:
                i += 1
            points.insert(i, p)
            owners.insert(i, candidate)

    def removed(self, candidate: Candidate) -> None:
        for p in self.points_for(candidate._id):
            i = bisect_left(self.points, p)
            while self.owners[i] is not candidate:  # another member's point at the same spot
                i += 1
            del self.points[i]
            del self.owners[i]

    def changed(self, candidate: Candidate, change: Change) -> None:
        # Weights do not move points: downweighting an instance must not remap its keys.
        pass


class ConsistentHash:
    """A hash ring on `--key` with `vnodes` points per instance and bounded load.

    The key goes to the first point clockwise; an instance that is full or already holds
    ceil((1 + epsilon) × (in flight + 1) / members) requests is passed over for the next one,
    so one hot key cannot overload an instance. Only the keys of an instance that leaves move.
    A downweighted instance's bound shrinks to its share (effective over configured weight),
    and it takes that share of the requests whose keys land on it; the others go on to the
    next point clockwise, as when it is full, and its keys stay its own.
    When `walk` points find nothing (near saturation), the key falls to a free member chosen by
    its hash. Without a key it is the fallback (least loaded by default).
    """

    name: ClassVar[StrategyName] = StrategyName.CONSISTENT_HASH

    def __init__(
        self,
        *,
        vnodes: int = 64,
        epsilon: float = 0.25,
        walk: int = 256,
        fallback: Strategy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if vnodes < 1 or epsilon < 0:
            raise ValueError("vnodes must be >= 1 and epsilon >= 0")
        self.vnodes = vnodes
        self.epsilon = epsilon
        self.walk = walk
        self.fallback: Strategy = fallback if fallback is not None else LeastLoaded(rng)
        self._points: dict[str, list[int]] = {}
        self._trace: tuple[Candidate | None, int] = (None, 0)

    def points_for(self, instance_id: str) -> list[int]:
        """The ring points of one instance (cached: a restored instance is not rehashed)."""
        points = self._points.get(instance_id)
        if points is None:
            points = self._points[instance_id] = ring_points(instance_id, self.vnodes)
        return points

    def _new_ring(self, candidates: CandidateSet) -> _Ring:
        return _Ring(candidates, self.points_for)

    def bound(self, candidates: CandidateSet) -> int:
        """The in-flight count at which a member is passed over."""
        n = len(candidates._members)
        return math.ceil((1 + self.epsilon) * (candidates._in_flight_total + 1) / n)

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        if selector.key is None:
            self._trace = (None, 0)
            return self.fallback.pick(candidates, selector)
        free = candidates._free
        if not free:
            return None
        ring = candidates.attach(self, self._new_ring)
        points, owners = ring.points, ring.owners
        size = len(points)
        h = ring_hash(selector.key)
        i = bisect_left(points, h)
        if i == size:
            i = 0
        bound = self.bound(candidates)
        self._trace = (owners[i], bound)
        passed: Candidate | None = None
        for _ in range(min(size, self.walk)):
            c = owners[i]
            if c._in_flight < c._max and c._in_flight < bound:
                if c._share >= 1.0:
                    return c
                # Downweighted: a load bound shrunk to its share, and that share of the keys
                # that land on it; the others go on to the next instance on the ring (a
                # stable second choice), not to its own next point.
                if c is not passed:
                    if c._in_flight < math.ceil(bound * c._share) and _take_turn(c):
                        return c
                    passed = c
            i += 1
            if i == size:
                i = 0
        return free[h % len(free)]

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        # The trace belongs to this request's pick only if there was one.
        home, bound = self._trace if winner is not None else (None, self.bound(candidates))
        notes = {}
        for c in candidates._members:
            parts = []
            if c is home:
                parts.append(f"key {selector.key!r} hashes here")
            parts.append(_load_note(c))
            own = bound if c._share >= 1.0 else math.ceil(bound * c._share)
            if c._share < 1.0:
                parts.append(f"downweighted: takes {c._share:.0%} of its keys, load bound {own}")
            if c._in_flight >= own > 0:
                parts.append(f"at load bound {own}")
            notes[c._id] = ", ".join(parts)
        if winner is None:
            why = "nothing free"
        elif selector.key is None:
            why = f"no key: {self.fallback.name}"
        elif winner is home:
            why = f"key {selector.key!r} hashes to it on the ring (under the load bound {bound})"
        elif home is not None:
            why = (
                f"key {selector.key!r} hashes to {home._id}, which is full or at the load bound "
                f"{bound}; {winner._id} is the next on the ring"
            )
        else:
            why = "nearest free member for the key"
        return Verdict(why, notes)
