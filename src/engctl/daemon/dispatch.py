"""Dispatch selection (SPEC §5): hard filters, seven strategies, `--explain`, and the index that
keeps a pick cheap at a thousand instances.

Pure code over plain values: no I/O, no processes, no asyncio; the clock and randomness are
injected. It imports only the stdlib and the shared `errors` contract, never another daemon
module: the dispatcher feeds it observations (in flight, latency, eligibility, weight) and asks it
for decisions.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import struct
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeVar, cast

from engctl.errors import NoEligibleEngineError, UsageError

Clock = Callable[[], float]
FilterKey = tuple[str | None, str | None, frozenset[str], frozenset[tuple[str, str]]]

# Lists in messages stay readable on a fleet of a thousand instances.
_MAX_LISTED = 12


class StrategyName(StrEnum):
    """The `--strategy` values; on the wire and in the daemon config."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_LOADED = "least_loaded"
    WEIGHTED_RANDOM = "weighted_random"
    CAPABILITY = "capability"
    AFFINITY = "affinity"
    CONSISTENT_HASH = "consistent_hash"


class FilterName(StrEnum):
    """The hard filters, in the order they are applied and reported."""

    TYPE = "type"
    ENGINE = "engine"
    INSTANCE = "instance"
    CAPABILITY = "capability"
    LABEL = "label"
    ELIGIBILITY = "eligibility"


class Outcome(StrEnum):
    """What a selection came to: a pick, a wait (every match is full) or an error."""

    PICKED = "picked"
    ALL_FULL = "all_full"
    NO_MATCH = "no_match"


class Change(Enum):
    """Which observation of a member changed, as told to a candidate set's observers."""

    LOAD = "load"
    WEIGHT = "weight"
    LATENCY = "latency"


def parse_strategy(name: str) -> StrategyName:
    """The strategy called `name`; a usage error lists the valid names."""
    try:
        return StrategyName(name)
    except ValueError as exc:
        valid = ", ".join(s.value for s in StrategyName)
        raise UsageError(f"unknown strategy {name!r} (strategies: {valid})") from exc


def parse_label(text: str) -> tuple[str, str]:
    """One `--label k=v` as a pair; the value may contain '=' but the key may not be empty."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"label {text!r} is not key=value")
    return key, value.strip()


class KeyMemory:
    """A bounded map from a request key to the instance id it last went to.

    Least recently used keys go first when full, and keys unused for `ttl` seconds are
    forgotten, so a stream of unique keys cannot grow the daemon.
    """

    __slots__ = ("_capacity", "_clock", "_entries", "_ttl")

    def __init__(
        self, capacity: int = 100_000, ttl: float | None = 3600.0, clock: Clock = time.monotonic
    ) -> None:
        if capacity < 1:
            raise ValueError("KeyMemory capacity must be at least 1")
        self._capacity = capacity
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        """The instance id remembered for `key`, or None when unknown or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._ttl is not None and self._clock() - entry[1] > self._ttl:
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: str, instance_id: str) -> None:
        """Remember that `key` went to `instance_id` now."""
        entries = self._entries
        entries[key] = (instance_id, self._clock())
        entries.move_to_end(key)
        if len(entries) > self._capacity:
            entries.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop `key`, if remembered."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


# A process-wide creation order gives every candidate set the same stable member order.
_SEQ = itertools.count()


def _check_weight(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, not {value!r}")
    return value


def _share(effective: float, configured: float) -> float:
    """The share of its turns a member takes: effective over configured weight, at most 1."""
    if configured <= 0 or effective >= configured:
        return 1.0
    return effective / configured


def _take_turn(c: Candidate) -> bool:
    """Whether a downweighted member takes the turn that came to it: each turn adds its share
    to its credit, and it takes one whole credit's worth (a share of 0.25: every 4th turn)."""
    credit = c._credit + c._share
    if credit >= 1.0:
        c._credit = credit - 1.0
        return True
    c._credit = credit
    return False


class Candidate:
    """A mutable view of one instance for selection.

    `in_flight`, `latency_ms` (a recent mean, e.g. an EWMA), `effective_weight`, `weight` and
    `eligible` may be set at any time: the setters keep every candidate set that holds the
    instance in step. Identity fields are read-only: to change type, capabilities, labels or
    max_concurrency, remove the candidate from its pool and add a new one.
    """

    __slots__ = (
        "_capabilities",
        "_credit",
        "_effective_weight",
        "_eligible",
        "_engine",
        "_id",
        "_in_flight",
        "_labels",
        "_latency_ms",
        "_max",
        "_picked",
        "_pool",
        "_seq",
        "_sets",
        "_share",
        "_type",
        "_vt",
        "_weight",
        "ineligible_reason",
    )

    def __init__(
        self,
        id: str,
        engine: str,
        type: str,
        *,
        capabilities: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        weight: float = 1.0,
        effective_weight: float | None = None,
        max_concurrency: int = 1,
        in_flight: int = 0,
        latency_ms: float | None = None,
        eligible: bool = True,
        ineligible_reason: str = "",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if in_flight < 0:
            raise ValueError(f"in_flight must be >= 0, not {in_flight}")
        self._id = id
        self._engine = engine
        self._type = type
        self._capabilities = frozenset(capabilities)
        self._labels: Mapping[str, str] = MappingProxyType(dict(labels or {}))
        self._weight = _check_weight(weight, "weight")
        self._effective_weight = _check_weight(
            self._weight if effective_weight is None else effective_weight, "effective_weight"
        )
        self._max = max_concurrency
        self._in_flight = in_flight
        self._latency_ms = None if latency_ms is None else _check_weight(latency_ms, "latency_ms")
        self._eligible = eligible
        self.ineligible_reason = ineligible_reason
        self._seq = next(_SEQ)
        self._sets: list[CandidateSet] = []
        self._pool: CandidatePool | None = None
        # The last plain Selection that picked this candidate (see CandidatePool.select).
        self._picked: Selection | None = None
        # Effective over configured weight (1.0 at full weight): round robin and the key
        # strategies give a downweighted member turns in this proportion, counted in `_credit`.
        self._share = _share(self._effective_weight, self._weight)
        self._credit = 0.0
        # least_loaded's virtual deadline (earliest first among equal loads); -1: not yet seen.
        self._vt = -1.0

    def __repr__(self) -> str:
        state = "eligible" if self._eligible else f"ineligible: {self.ineligible_reason or '?'}"
        return (
            f"Candidate({self._id!r}, type={self._type!r}, in_flight={self._in_flight}/"
            f"{self._max}, weight={self._effective_weight:g}/{self._weight:g}, {state})"
        )

    @property
    def id(self) -> str:
        """The instance as `name#k`."""
        return self._id

    @property
    def engine(self) -> str:
        return self._engine

    @property
    def type(self) -> str:
        return self._type

    @property
    def capabilities(self) -> frozenset[str]:
        return self._capabilities

    @property
    def labels(self) -> Mapping[str, str]:
        return self._labels

    @property
    def max_concurrency(self) -> int:
        return self._max

    @property
    def weight(self) -> float:
        """The configured weight (shown by explain; picks use `effective_weight`)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = _check_weight(value, "weight")
        self._share = _share(self._effective_weight, self._weight)

    @property
    def effective_weight(self) -> float:
        """The weight picks use: the configured one, or lower while downweighted."""
        return self._effective_weight

    @effective_weight.setter
    def effective_weight(self, value: float) -> None:
        value = _check_weight(value, "effective_weight")
        if value != self._effective_weight:
            self._effective_weight = value
            self._share = _share(value, self._weight)
            for s in self._sets:
                s._changed(self, Change.WEIGHT)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"in_flight must be >= 0, not {value}")
        old = self._in_flight
        if value != old:
            self._in_flight = value
            for s in self._sets:
                s._load_changed(self, old)

    @property
    def latency_ms(self) -> float | None:
        """Recent mean latency in milliseconds, None until measured."""
        return self._latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float | None) -> None:
        value = None if value is None else _check_weight(value, "latency_ms")
        if value != self._latency_ms:
            self._latency_ms = value
            for s in self._sets:
                s._changed(self, Change.LATENCY)

    @property
    def eligible(self) -> bool:
        """Whether dispatch may pick it at all (not isolated, draining, fatal or stopped)."""
        return self._eligible

    @eligible.setter
    def eligible(self, value: bool) -> None:
        if value == self._eligible:
            return
        self._eligible = value
        if self._pool is not None:
            self._pool._eligibility_changed(self)
        elif not value:
            for s in list(self._sets):
                s._discard(self)

    @property
    def full(self) -> bool:
        """At max_concurrency: not picked, the caller queues."""
        return self._in_flight >= self._max

    @property
    def load(self) -> float:
        """In flight relative to max_concurrency (1.0 is full)."""
        return self._in_flight / self._max


@dataclass(frozen=True, slots=True)
class Selector:
    """What one request asks for: hard filters, preferences, a key and a strategy.

    `require` (`--cap`) and `labels` (`--label k=v`, all must match) are hard filters like
    type, engine and instance; `prefer` (`--prefer`) only scores. `key` drives `affinity` and
    `consistent_hash`; `strategy` None means the pool's default. Build one with `Selector.of`.
    """

    type: str | None = None
    engine: str | None = None
    instance: str | None = None
    require: frozenset[str] = frozenset()
    prefer: frozenset[str] = frozenset()
    labels: frozenset[tuple[str, str]] = frozenset()
    key: str | None = None
    strategy: StrategyName | None = None
    filter_key: FilterKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: the pool looks its candidate set up by this on every request.
        object.__setattr__(self, "filter_key", (self.type, self.engine, self.require, self.labels))

    @classmethod
    def of(
        cls,
        *,
        type: str | None = None,
        engine: str | None = None,
        instance: str | None = None,
        require: Iterable[str] = (),
        prefer: Iterable[str] = (),
        labels: Mapping[str, str] | Iterable[str] | None = None,
        key: str | None = None,
        strategy: str | None = None,
    ) -> Selector:
        """A selector from CLI-shaped values: labels as a mapping or as `k=v` strings."""
        if labels is None:
            pairs: frozenset[tuple[str, str]] = frozenset()
        elif isinstance(labels, Mapping):
            pairs = frozenset((str(k), str(v)) for k, v in labels.items())
        else:
            pairs = frozenset(parse_label(text) for text in labels)
        return cls(
            type=type,
            engine=engine,
            instance=instance,
            require=frozenset(require),
            prefer=frozenset(prefer),
            labels=pairs,
            key=key,
            strategy=None if strategy is None else parse_strategy(strategy),
        )

    def matches(self, candidate: Candidate) -> bool:
        """Whether `candidate` passes every hard filter, eligibility included."""
        if self.instance is not None and candidate._id != self.instance:
            return False
        return candidate._eligible and _matches_key(candidate, self.filter_key)

    def to_json(self) -> dict[str, Any]:
        """The selector for `--explain --json` and error data."""
        return {
            "type": self.type,
            "engine": self.engine,
            "instance": self.instance,
            "require": sorted(self.require),
            "prefer": sorted(self.prefer),
            "labels": dict(sorted(self.labels)),
            "key": self.key,
            "strategy": None if self.strategy is None else self.strategy.value,
        }


def _matches_key(c: Candidate, key: FilterKey) -> bool:
    type_, engine, require, labels = key
    if type_ is not None and c._type != type_:
        return False
    if engine is not None and c._engine != engine:
        return False
    if require and not require <= c._capabilities:
        return False
    got = c._labels
    return all(got.get(k) == v for k, v in labels)


class SetObserver(Protocol):
    """Per-set strategy state that follows membership and observations incrementally."""

    def added(self, candidate: Candidate) -> None: ...

    def removed(self, candidate: Candidate) -> None: ...

    def changed(self, candidate: Candidate, change: Change) -> None: ...


_S = TypeVar("_S", bound=SetObserver)


class CandidateSet:
    """The eligible instances that pass one selector's filters, in a stable order.

    The pool keeps one per distinct filter and updates it in place; strategies read the members
    and the members that are not full, and keep their own state here with `attach`, so a pick
    never scans the fleet. A set built directly (tests, small tools) holds the eligible
    candidates it is given and drops any that become ineligible.
    """

    __slots__ = (
        "_by_id",
        "_capacity",
        "_free",
        "_free_seqs",
        "_in_flight_total",
        "_members",
        "_observers",
        "_seqs",
        "_states",
        "memory",
    )

    def __init__(
        self, candidates: Iterable[Candidate] = (), *, memory: KeyMemory | None = None
    ) -> None:
        self._members: list[Candidate] = []
        self._seqs: list[int] = []
        self._free: list[Candidate] = []
        self._free_seqs: list[int] = []
        self._by_id: dict[str, Candidate] = {}
        self._in_flight_total = 0
        self._capacity = 0
        self._states: dict[object, SetObserver] = {}
        self._observers: list[SetObserver] = []
        self.memory = memory if memory is not None else KeyMemory()
        """Which instance each key last ran on (the capability score's affinity factor)."""
        for c in candidates:
            if c._eligible:
                self._add(c)

    @property
    def members(self) -> Sequence[Candidate]:
        """Every member in stable order (read-only: the set owns the list)."""
        return self._members

    @property
    def free(self) -> Sequence[Candidate]:
        """Members below max_concurrency, in the same order."""
        return self._free

    @property
    def in_flight_total(self) -> int:
        return self._in_flight_total

    @property
    def capacity(self) -> int:
        """Sum of the members' max_concurrency."""
        return self._capacity

    def get(self, instance_id: str) -> Candidate | None:
        """The member with this id, or None."""
        return self._by_id.get(instance_id)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._members)

    def __contains__(self, candidate: object) -> bool:
        return isinstance(candidate, Candidate) and self._by_id.get(candidate._id) is candidate

    def attach(self, owner: object, factory: Callable[[CandidateSet], _S]) -> _S:
        """The state `owner` keeps for this set, made by `factory` on first use; it then
        observes every change to the set."""
        state = self._states.get(owner)
        if state is None:
            state = factory(self)
            self._states[owner] = state
            self._observers.append(state)
        return cast(_S, state)

    def _add(self, c: Candidate) -> None:
        i = bisect_left(self._seqs, c._seq)
        self._seqs.insert(i, c._seq)
        self._members.insert(i, c)
        self._by_id[c._id] = c
        c._sets.append(self)
        self._in_flight_total += c._in_flight
        self._capacity += c._max
        if c._in_flight < c._max:
            self._free_insert(c)
        for o in self._observers:
            o.added(c)

    def _discard(self, c: Candidate) -> None:
        if self._by_id.get(c._id) is not c:
            return
        del self._by_id[c._id]
        i = bisect_left(self._seqs, c._seq)
        del self._seqs[i]
        del self._members[i]
        c._sets.remove(self)
        self._in_flight_total -= c._in_flight
        self._capacity -= c._max
        if c._in_flight < c._max:
            self._free_remove(c)
        for o in self._observers:
            o.removed(c)

    def _release(self) -> None:
        """Forget every member (the pool evicted this set from its cache)."""
        for c in self._members:
            c._sets.remove(self)
        self._members.clear()
        self._seqs.clear()
        self._free.clear()
        self._free_seqs.clear()
        self._by_id.clear()
        self._states.clear()
        self._observers.clear()

    def _free_insert(self, c: Candidate) -> None:
        i = bisect_left(self._free_seqs, c._seq)
        self._free_seqs.insert(i, c._seq)
        self._free.insert(i, c)

    def _free_remove(self, c: Candidate) -> None:
        i = bisect_left(self._free_seqs, c._seq)
        del self._free_seqs[i]
        del self._free[i]

    def _load_changed(self, c: Candidate, old: int) -> None:
        new = c._in_flight
        self._in_flight_total += new - old
        limit = c._max
        if old >= limit > new:
            self._free_insert(c)
        elif new >= limit > old:
            self._free_remove(c)
        for o in self._observers:
            o.changed(c, Change.LOAD)

    def _changed(self, c: Candidate, change: Change) -> None:
        for o in self._observers:
            o.changed(c, change)


# --- strategies ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a strategy says for `--explain`: a note per member id and why the winner won.

    `factors` and `scores` are filled by the scored strategy only.
    """

    why: str
    notes: Mapping[str, str]
    factors: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """An extension point: pick one member that is not full, and explain the pick."""

    @property
    def name(self) -> StrategyName: ...

    def pick(self, candidates: CandidateSet, selector: Selector) -> Candidate | None:
        """A member below max_concurrency, or None when every member is full."""
        ...

    def describe(
        self, candidates: CandidateSet, selector: Selector, winner: Candidate | None
    ) -> Verdict:
        """Notes for `--explain`, called right after `pick` (it may scan: it is rare)."""
        ...


def _load_note(c: Candidate) -> str:
    note = f"in flight {c._in_flight}/{c._max}"
    return note + " (full)" if c._in_flight >= c._max else note


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


class _WeightedState:
    """Strategy state derived from members and weights: marked dirty when either changes."""

    __slots__ = ("dirty",)

    def __init__(self) -> None:
        self.dirty = True

    def added(self, candidate: Candidate) -> None:
        self.dirty = True

    def removed(self, candidate: Candidate) -> None:
        self.dirty = True

    def changed(self, candidate: Candidate, change: Change) -> None:
        if change is Change.WEIGHT:
            self.dirty = True


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


@dataclass(frozen=True, slots=True)
class CapabilityWeights:
    """Factor weights of the scored strategy (SPEC §5); configurable in the daemon config."""

    type: float = 0.40
    capability: float = 0.25
    load: float = 0.20
    performance: float = 0.10
    affinity: float = 0.05

    def __post_init__(self) -> None:
        for name in ("type", "capability", "load", "performance", "affinity"):
            _check_weight(getattr(self, name), f"capability weight {name}")


FACTORS = ("type", "capability", "load", "performance", "affinity")


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
        """The five factor values of one member, in FACTORS order."""
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
            rows.append((order, c, dict(zip(FACTORS, f, strict=True)), self.score(c, f)))
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
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") >> 2


def ring_points(instance_id: str, vnodes: int) -> list[int]:
    """An instance's `vnodes` ring points, stable across processes.

    One extendable-output hash gives them all: a thousand instances hash in milliseconds,
    where one digest per point took a large fraction of a second.
    """
    raw = hashlib.shake_128(instance_id.encode()).digest(4 * vnodes)
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


def default_strategies(
    *,
    rng: random.Random | None = None,
    clock: Clock = time.monotonic,
    weights: CapabilityWeights | None = None,
) -> dict[StrategyName, Strategy]:
    """One instance of each strategy, sharing `rng` and `clock`."""
    rng = rng if rng is not None else random.Random()
    return {
        StrategyName.ROUND_ROBIN: RoundRobin(),
        StrategyName.WEIGHTED_ROUND_ROBIN: SmoothWeightedRoundRobin(),
        StrategyName.LEAST_LOADED: LeastLoaded(rng),
        StrategyName.WEIGHTED_RANDOM: WeightedRandom(rng),
        StrategyName.CAPABILITY: Capability(weights),
        StrategyName.AFFINITY: Affinity(rng=rng, clock=clock),
        StrategyName.CONSISTENT_HASH: ConsistentHash(rng=rng),
    }


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoMatch:
    """Why nothing qualified: the filter that left nothing and what exists instead."""

    filter: FilterName | None
    message: str
    available: tuple[str, ...] = ()

    def error(self, explanation: Explanation | None = None) -> NoEligibleEngineError:
        """The error for the wire (exit code 4), with the filter, what exists and the
        explanation in its data."""
        data: dict[str, Any] = {
            "filter": None if self.filter is None else self.filter.value,
            "available": list(self.available),
        }
        if explanation is not None:
            data["explain"] = explanation.to_json()
        return NoEligibleEngineError(self.message, data)


@dataclass(frozen=True, slots=True)
class Assessment:
    """One instance's line in `--explain`."""

    instance: str
    engine: str
    type: str
    excluded_by: FilterName | None
    note: str
    in_flight: int
    max_concurrency: int
    weight: float
    effective_weight: float
    score: float | None = None
    factors: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "engine": self.engine,
            "type": self.type,
            "excluded_by": None if self.excluded_by is None else self.excluded_by.value,
            "note": self.note,
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
            "weight": self.weight,
            "effective_weight": self.effective_weight,
            "score": self.score,
            "factors": dict(self.factors),
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """What `engctl exec --explain` prints: every instance, the filter that excluded it or its
    factors, the winner and why it won (or why nothing qualified)."""

    selector: Selector
    strategy: StrategyName
    outcome: Outcome
    winner: str | None
    reason: str
    candidates: tuple[Assessment, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "selector": self.selector.to_json(),
            "strategy": self.strategy.value,
            "outcome": self.outcome.value,
            "winner": self.winner,
            "reason": self.reason,
            "candidates": [a.to_json() for a in self.candidates],
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The decision for one request.

    PICKED: run it on `candidate`. ALL_FULL: every match is at max_concurrency; queue it and
    select again when one frees up (`message` says so). NO_MATCH: `no_match` says which filter
    left nothing; `raise_if_no_match` turns it into NoEligibleEngineError.
    """

    outcome: Outcome
    strategy: StrategyName
    candidate: Candidate | None = None
    matched: int = 0
    message: str = ""
    no_match: NoMatch | None = None
    explanation: Explanation | None = None

    def raise_if_no_match(self) -> None:
        """Raise NoEligibleEngineError when nothing qualified."""
        if self.no_match is not None:
            raise self.no_match.error(self.explanation)


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    if not items:
        return "none"
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, and {more} more" if more > 0 else shown


def _scope(selector: Selector) -> str:
    parts = []
    if selector.type is not None:
        parts.append(f"of type {selector.type}")
    if selector.engine is not None:
        parts.append(f"of engine {selector.engine}")
    return (" " + " ".join(parts)) if parts else ""


def _labels_text(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(pairs)]


def exclusion(c: Candidate, selector: Selector) -> tuple[FilterName, str] | None:
    """The first hard filter `c` fails for `selector`, with a short note, or None."""
    if selector.type is not None and c._type != selector.type:
        return FilterName.TYPE, f"type {c._type}"
    if selector.engine is not None and c._engine != selector.engine:
        return FilterName.ENGINE, f"engine {c._engine}"
    if selector.instance is not None and c._id != selector.instance:
        return FilterName.INSTANCE, f"not {selector.instance}"
    missing = selector.require - c._capabilities
    if missing:
        return FilterName.CAPABILITY, f"lacks {', '.join(sorted(missing))}"
    wrong = [(k, v) for k, v in selector.labels if c._labels.get(k) != v]
    if wrong:
        return FilterName.LABEL, f"lacks label {', '.join(_labels_text(wrong))}"
    if not c._eligible:
        return FilterName.ELIGIBILITY, c.ineligible_reason or "not eligible"
    return None


class CandidatePool:
    """Every dispatchable instance, indexed for selection; the daemon keeps it in step.

    Add a Candidate when an instance can take requests (worker mode), remove it when the
    instance goes away, and set its fields as observations arrive. `select` filters through a
    cached CandidateSet per distinct filter (updated in place, least recently used evicted past
    `max_sets`) and asks the strategy; it records which instance each key ran on.
    """

    def __init__(
        self,
        *,
        default_strategy: StrategyName = StrategyName.LEAST_LOADED,
        strategies: Mapping[StrategyName, Strategy] | None = None,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
        memory: KeyMemory | None = None,
        max_sets: int = 256,
    ) -> None:
        self.default_strategy = default_strategy
        self.strategies: dict[StrategyName, Strategy] = (
            dict(strategies) if strategies is not None else default_strategies(rng=rng, clock=clock)
        )
        self.memory = memory if memory is not None else KeyMemory(clock=clock)
        self._max_sets = max_sets
        self._all: dict[str, Candidate] = {}
        self._by_type: dict[str, dict[str, Candidate]] = {}
        self._by_engine: dict[str, dict[str, Candidate]] = {}
        self._sets: OrderedDict[FilterKey, CandidateSet] = OrderedDict()

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(list(self._all.values()))

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._all

    def get(self, instance_id: str) -> Candidate:
        """The candidate with this id (KeyError when absent)."""
        return self._all[instance_id]

    def add(self, candidate: Candidate) -> None:
        """Index a new instance; it joins every cached set whose filters it passes."""
        if candidate._id in self._all:
            raise ValueError(f"instance {candidate._id} is already in the pool")
        if candidate._pool is not None:
            raise ValueError(f"instance {candidate._id} belongs to another pool")
        candidate._pool = self
        self._all[candidate._id] = candidate
        self._by_type.setdefault(candidate._type, {})[candidate._id] = candidate
        self._by_engine.setdefault(candidate._engine, {})[candidate._id] = candidate
        if candidate._eligible:
            self._join_sets(candidate)

    def remove(self, instance_id: str) -> Candidate:
        """Drop an instance from the pool and from every set; returns it."""
        c = self._all.pop(instance_id)
        for index, group in ((self._by_type, c._type), (self._by_engine, c._engine)):
            members = index[group]
            del members[instance_id]
            if not members:
                del index[group]
        for s in list(c._sets):
            s._discard(c)
        c._pool = None
        return c

    def _join_sets(self, c: Candidate) -> None:
        for key, s in self._sets.items():
            if _matches_key(c, key):
                s._add(c)

    def _eligibility_changed(self, c: Candidate) -> None:
        if c._eligible:
            self._join_sets(c)
        else:
            for s in list(c._sets):
                s._discard(c)

    def candidate_set(self, selector: Selector) -> CandidateSet:
        """The maintained set for the selector's type, engine, capability and label filters."""
        key = selector.filter_key
        sets = self._sets
        s = sets.get(key)
        if s is not None:
            sets.move_to_end(key)
            return s
        s = CandidateSet(memory=self.memory)
        type_, engine, _, _ = key
        if engine is not None:
            base = self._by_engine.get(engine, {})
        elif type_ is not None:
            base = self._by_type.get(type_, {})
        else:
            base = self._all
        for c in base.values():
            if c._eligible and _matches_key(c, key):
                s._add(c)
        sets[key] = s
        if len(sets) > self._max_sets:
            _, old = sets.popitem(last=False)
            old._release()
        return s

    def select(self, selector: Selector, *, explain: bool = False) -> Selection:
        """Decide where one request goes; with `explain`, also say why (this scans)."""
        name = selector.strategy if selector.strategy is not None else self.default_strategy
        strategy = self.strategies.get(name)
        if strategy is None:
            raise UsageError(f"strategy {name} is not enabled in this daemon")
        if selector.instance is not None:
            return self._select_instance(selector.instance, selector, name, explain)
        s = self.candidate_set(selector)
        if not s._members:
            return self._no_match(selector, name, explain)
        winner = strategy.pick(s, selector) if s._free else None
        if winner is None:
            n = len(s._members)
            what = f"the one instance{_scope(selector)} is" if n == 1 else f"all {n} instances"
            if n > 1:
                what += f"{_scope(selector)} are"
            msg = f"{what} full (in flight {s._in_flight_total}/{s._capacity})"
            expl = (
                self._explain(selector, name, s, None, Outcome.ALL_FULL, msg) if explain else None
            )
            return Selection(
                Outcome.ALL_FULL, name, matched=len(s._members), message=msg, explanation=expl
            )
        expl = None
        if explain:
            expl = self._explain(selector, name, s, winner, Outcome.PICKED, "")
        if selector.key is not None:
            self.memory.put(selector.key, winner._id)
        if explain:
            return Selection(Outcome.PICKED, name, winner, len(s._members), explanation=expl)
        # A Selection is frozen, so the same pick can be answered with the same object: a
        # frozen dataclass costs ~0.8 µs to build, a good part of a pick.
        sel = winner._picked
        if sel is None or sel.strategy is not name or sel.matched != len(s._members):
            sel = winner._picked = Selection(Outcome.PICKED, name, winner, len(s._members))
        return sel

    def _select_instance(
        self, instance: str, selector: Selector, name: StrategyName, explain: bool
    ) -> Selection:
        c = self._all.get(instance)
        excluded = None if c is None else exclusion(c, selector)
        if c is None or excluded is not None:
            return self._no_match(selector, name, explain)
        single = CandidateSet([c], memory=self.memory) if explain else None
        if c._in_flight >= c._max:
            msg = f"instance {c._id} is full (in flight {c._in_flight}/{c._max})"
            expl = (
                self._explain(selector, name, single, None, Outcome.ALL_FULL, msg)
                if explain
                else None
            )
            if single is not None:
                single._release()
            return Selection(Outcome.ALL_FULL, name, matched=1, message=msg, explanation=expl)
        expl = None
        if explain:
            expl = self._explain(selector, name, single, c, Outcome.PICKED, "")
        if single is not None:
            single._release()
        if selector.key is not None:
            self.memory.put(selector.key, c._id)
        return Selection(Outcome.PICKED, name, c, 1, explanation=expl)

    def _no_match(self, selector: Selector, name: StrategyName, explain: bool) -> Selection:
        no_match = self.diagnose(selector)
        expl = None
        if explain:
            expl = self._explain(selector, name, None, None, Outcome.NO_MATCH, no_match.message)
        return Selection(
            Outcome.NO_MATCH, name, message=no_match.message, no_match=no_match, explanation=expl
        )

    def diagnose(self, selector: Selector) -> NoMatch:
        """Which filter leaves nothing for `selector`, listing what exists (scans: error path)."""
        pool = list(self._all.values())
        if not pool:
            return NoMatch(None, "no dispatchable instances are registered")
        if selector.type is not None:
            narrowed = [c for c in pool if c._type == selector.type]
            if not narrowed:
                types = sorted(self._by_type)
                return NoMatch(
                    FilterName.TYPE,
                    f"no engine of type {selector.type!r} (types: {_listed(types)})",
                    tuple(types),
                )
            pool = narrowed
        if selector.engine is not None:
            narrowed = [c for c in pool if c._engine == selector.engine]
            if not narrowed:
                named = self._by_engine.get(selector.engine)
                if named:
                    actual = next(iter(named.values()))._type
                    msg = f"engine {selector.engine!r} is of type {actual!r}, not {selector.type!r}"
                    return NoMatch(FilterName.ENGINE, msg, (actual,))
                engines = sorted({c._engine for c in pool})
                where = f" of type {selector.type}" if selector.type is not None else ""
                return NoMatch(
                    FilterName.ENGINE,
                    f"no engine named {selector.engine!r} (engines{where}: {_listed(engines)})",
                    tuple(engines),
                )
            pool = narrowed
        if selector.instance is not None:
            narrowed = [c for c in pool if c._id == selector.instance]
            if not narrowed:
                ids = [c._id for c in pool]
                found = self._all.get(selector.instance)
                if found is not None:
                    clash = []
                    if selector.type is not None and found._type != selector.type:
                        clash.append(f"of type {found._type!r}, not {selector.type!r}")
                    if selector.engine is not None and found._engine != selector.engine:
                        clash.append(f"of engine {found._engine!r}, not {selector.engine!r}")
                    msg = f"instance {selector.instance!r} is {' and '.join(clash)}"
                else:
                    msg = f"no instance {selector.instance!r} (instances{_scope(selector)}: "
                    msg += f"{_listed(ids)})"
                return NoMatch(FilterName.INSTANCE, msg, tuple(ids))
            pool = narrowed
        scope = _scope(selector)
        if selector.require:
            narrowed = [c for c in pool if selector.require <= c._capabilities]
            if not narrowed:
                seen = sorted(set().union(*(c._capabilities for c in pool)))
                wanted = sorted(selector.require)
                noun = "capability" if len(wanted) == 1 else "capabilities"
                msg = (
                    f"no instance{scope} has {noun} {', '.join(wanted)} "
                    f"(capabilities seen: {_listed(seen)})"
                )
                return NoMatch(FilterName.CAPABILITY, msg, tuple(seen))
            pool = narrowed
        if selector.labels:
            narrowed = [c for c in pool if all(c._labels.get(k) == v for k, v in selector.labels)]
            if not narrowed:
                seen = sorted({f"{k}={v}" for c in pool for k, v in c._labels.items()})
                wanted = _labels_text(selector.labels)
                if selector.require:
                    scope += f" with {', '.join(sorted(selector.require))}"
                noun = "label" if len(wanted) == 1 else "labels"
                msg = (
                    f"no instance{scope} has {noun} {', '.join(wanted)} "
                    f"(labels seen: {_listed(seen)})"
                )
                return NoMatch(FilterName.LABEL, msg, tuple(seen))
            pool = narrowed
        why = [f"{c._id}: {c.ineligible_reason or 'not eligible'}" for c in pool]
        noun = "instance matches" if len(pool) == 1 else "instances match"
        msg = (
            f"no eligible instance{scope}: {len(pool)} {noun} but none is eligible ({_listed(why)})"
        )
        return NoMatch(FilterName.ELIGIBILITY, msg, tuple(c._id for c in pool))

    def _explain(
        self,
        selector: Selector,
        name: StrategyName,
        members: CandidateSet | None,
        winner: Candidate | None,
        outcome: Outcome,
        reason: str,
    ) -> Explanation:
        verdict = None
        if members is not None and selector.instance is None:
            verdict = self.strategies[name].describe(members, selector, winner)
        lines = []
        for c in self._all.values():
            excluded = exclusion(c, selector)
            if excluded is not None:
                flt, note = excluded
                score: float | None = None
                factors: Mapping[str, float] = {}
            else:
                flt = None
                if verdict is not None:
                    note = verdict.notes.get(c._id, "")
                    score = verdict.scores.get(c._id)
                    factors = verdict.factors.get(c._id, {})
                else:
                    note, score, factors = f"asked for by id, {_load_note(c)}", None, {}
            lines.append(
                Assessment(
                    c._id,
                    c._engine,
                    c._type,
                    flt,
                    note,
                    c._in_flight,
                    c._max,
                    c._weight,
                    c._effective_weight,
                    score,
                    factors,
                )
            )
        if outcome is Outcome.PICKED and winner is not None:
            if verdict is not None:
                reason = f"{name}: {verdict.why}"
            else:
                reason = f"instance {winner._id} asked for explicitly"
        return Explanation(
            selector, name, outcome, None if winner is None else winner._id, reason, tuple(lines)
        )
