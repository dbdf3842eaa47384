"""The candidates of selection: one mutable view per dispatchable instance, the sets of them
that pass one selector's filters (kept up to date in place), and the key memory.

Part of `engctl.daemon.selection` (see its privacy rule): imports the stdlib only.
"""

from __future__ import annotations

import itertools
import math
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from .pool import CandidatePool, Selection

Clock = Callable[[], float]
# What a candidate set is cached by: type, engine, required capabilities, labels.
FilterKey = tuple[str | None, str | None, frozenset[str], frozenset[tuple[str, str]]]


class CandidateKind(Enum):
    """What a candidate stands for: one instance (`name#k`) of a worker engine, or a oneshot
    engine as a whole (`name#oneshot`: a process per request, up to its max_concurrency)."""

    INSTANCE = "instance"
    ONESHOT = "oneshot"


class Change(Enum):
    """Which observation of a member changed, as told to a candidate set's observers."""

    LOAD = "load"
    WEIGHT = "weight"
    LATENCY = "latency"


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
        "_kind",
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
        "lease",
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
        kind: CandidateKind = CandidateKind.INSTANCE,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if in_flight < 0:
            raise ValueError(f"in_flight must be >= 0, not {in_flight}")
        self._id = id
        self._engine = engine
        self._type = type
        self._kind = kind
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
        # The lease that holds the instance: it is then ineligible for every request but the
        # ones that carry this lease (which name it: see `explain.exclusion`).
        self.lease: str | None = None
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
        """The instance as `name#k` (a oneshot engine: `name#oneshot`)."""
        return self._id

    @property
    def engine(self) -> str:
        return self._engine

    @property
    def kind(self) -> CandidateKind:
        """An instance of a worker engine, or a oneshot engine (no process between requests)."""
        return self._kind

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
