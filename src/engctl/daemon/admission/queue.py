"""The wait queue: requests that cannot run now, in the order they are served.

Three levels of choice, each a plain rule:

1. **Priority with aging.** Each priority level competes with the arrival time of its oldest
   request that could run, minus `priority × aging`: a level is worth `aging` seconds of
   waiting. So a higher priority goes first, and a request of priority p is overtaken only by
   requests of a higher priority q that arrived less than (q - p) × aging after it: once it has
   waited (9 - p) × aging nothing that arrives later goes before it (no starvation). Linear
   aging has this exact form: the order of `arrival - priority × aging` never changes.
2. **Fairness between callers of a level.** Weighted fair queuing with virtual times (start-time
   fair queuing): each service charges the caller 1 / weight, the caller with the least
   virtual time goes next, and a caller that comes back after being idle starts at the level's
   virtual clock (no credit saved up). Equal weights: round robin.
3. **Within a caller**, its requests wait in classes: those that wait for the same thing (the
   router's key: filters, pinned instance). A class is FIFO; between classes, the oldest head
   goes first, or with shortest-expected-job-first (`sjf`) the smallest arrival + expected
   latency (a long job is overtaken only by jobs that arrived within its expected length).

A scan (`take` until the router has tried enough, `put_back` what could not run, `served` for
what did) skips the classes the router says are blocked, so one full type does not hide the
others. Every operation is linear in the classes waiting (callers × distinct wait keys), not in
the requests.

Part of `engctl.daemon.admission`: pure, time is passed in. Imports the stdlib only.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

# Priorities (engctl.admission_config): 0 to 9.
TOP_PRIORITY = 9


class Entry:
    """One waiting item (a request) with what the queue orders it by."""

    __slots__ = ("alive", "arrived", "caller", "cls", "item", "priority", "seq")

    def __init__(
        self, item: Any, priority: int, caller: str, arrived: float, cls: _Class, seq: int
    ) -> None:
        self.item = item
        self.priority = priority
        self.caller = caller
        self.arrived = arrived
        self.cls = cls
        self.seq = seq
        self.alive = True


class _Class:
    """A caller's requests at one priority that wait for the same thing: FIFO."""

    __slots__ = ("entries", "expected", "key", "owner")

    def __init__(self, key: Hashable, owner: _Caller) -> None:
        self.key = key
        self.owner = owner
        self.entries: collections.deque[Entry] = collections.deque()
        self.expected = 0.0  # seconds, for shortest-expected-job-first (0: FIFO)

    def head(self) -> Entry | None:
        entries = self.entries
        while entries and not entries[0].alive:
            entries.popleft()
        return entries[0] if entries else None


class _Caller:
    """One caller's requests at one priority, and the service it has had (virtual time)."""

    __slots__ = ("classes", "live", "name", "vtime", "weight")

    def __init__(self, name: str, weight: float, vtime: float) -> None:
        self.name = name
        self.weight = weight
        self.vtime = vtime
        self.classes: dict[Hashable, _Class] = {}
        self.live = 0


class _Level:
    __slots__ = ("callers", "live", "priority", "vclock")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.callers: dict[str, _Caller] = {}
        self.vclock = 0.0  # the virtual time of the last service at this level
        self.live = 0


Skip = Callable[[Hashable], bool]


def _never(key: Hashable) -> bool:
    return False


class WaitQueue:
    """Requests waiting to run, served by priority (with aging), fairly between callers."""

    def __init__(self, aging: float = 1.0) -> None:
        self.aging = aging
        self._levels: dict[int, _Level] = {}
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def push(
        self,
        item: Any,
        priority: int,
        caller: str,
        now: float,
        key: Hashable,
        weight: float = 1.0,
        expected: float = 0.0,
    ) -> Entry:
        """Queue `item`: it waits for what `key` names (requests of one key are FIFO);
        `expected` is its expected run time in seconds when its type is served shortest
        first (0 otherwise); `weight` is the caller's share against the level's others."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level(priority)
        owner = level.callers.get(caller)
        if owner is None:
            # Back from idle (or new): from the level's virtual clock, with no saved credit.
            owner = level.callers[caller] = _Caller(caller, weight, level.vclock)
        owner.weight = weight
        cls = owner.classes.get(key)
        if cls is None:
            cls = owner.classes[key] = _Class(key, owner)
        cls.expected = expected
        entry = Entry(item, priority, caller, now, cls, next(self._seq))
        cls.entries.append(entry)
        owner.live += 1
        level.live += 1
        self._live += 1
        return entry

    def discard(self, entry: Entry) -> bool:
        """Take `entry` out (it timed out or failed while waiting); False if it was not in."""
        if not entry.alive:
            return False
        entry.alive = False  # left in its deque, skipped (and dropped) when it reaches the head
        self._count_out(entry)
        return True

    def _count_out(self, entry: Entry) -> None:
        owner = entry.cls.owner
        owner.live -= 1
        self._levels[entry.priority].live -= 1
        self._live -= 1

    def take(self, skip: Skip = _never) -> Entry | None:
        """Remove and return the next entry in service order, leaving out the classes whose
        key `skip` refuses; None when nothing else may run. Give it back with `put_back` if
        it cannot run after all, or confirm it with `served`."""
        best_level: _Level | None = None
        best_key = math.inf
        for level in self._levels.values():
            if level.live <= 0:
                continue
            oldest = math.inf
            for owner in level.callers.values():
                if owner.live <= 0:
                    continue
                for cls in owner.classes.values():
                    head = cls.head()
                    if head is not None and head.arrived < oldest and not skip(cls.key):
                        oldest = head.arrived
            if oldest == math.inf:
                continue
            key = oldest - level.priority * self.aging
            if key < best_key or (
                key == best_key and best_level is not None and level.priority > best_level.priority
            ):
                best_level, best_key = level, key
        if best_level is None:
            return None
        chosen: _Class | None = None
        chosen_rank = (math.inf, math.inf)
        for owner in best_level.callers.values():
            if owner.live <= 0:
                continue
            for cls in owner.classes.values():
                head = cls.head()
                if head is None or skip(cls.key):
                    continue
                # The caller with the least service first; within it the smallest arrival
                # (plus the expected run time, for shortest-expected-job-first).
                rank = (owner.vtime, head.arrived + cls.expected)
                if rank < chosen_rank:
                    chosen, chosen_rank = cls, rank
        assert chosen is not None
        entry = chosen.entries.popleft()
        entry.alive = False
        self._count_out(entry)
        return entry

    def put_back(self, entries: list[Entry]) -> None:
        """Return entries `take` gave (in the order it gave them) to their places: same
        arrival, same class, the head of it again; their callers are not charged."""
        for entry in reversed(entries):
            entry.alive = True
            entry.cls.entries.appendleft(entry)
            entry.cls.owner.live += 1
            level = self._levels[entry.priority]
            level.live += 1
            self._live += 1

    def served(self, entry: Entry) -> None:
        """An entry `take` gave now runs: its caller is charged one service."""
        owner = entry.cls.owner
        level = self._levels.get(entry.priority)
        if level is not None:
            level.vclock = max(level.vclock, owner.vtime)
        owner.vtime += 1.0 / owner.weight

    def tidy(self) -> None:
        """Forget empty classes, callers and levels (after a scan: `take` leaves them so that
        `put_back` finds them with their virtual times)."""
        for priority, level in list(self._levels.items()):
            for name, owner in list(level.callers.items()):
                for key, cls in list(owner.classes.items()):
                    if cls.head() is None:
                        del owner.classes[key]
                if not owner.classes:
                    del level.callers[name]
            if not level.callers:
                del self._levels[priority]

    def entries(self) -> Iterator[Entry]:
        """Every waiting entry (any order)."""
        for level in self._levels.values():
            for owner in level.callers.values():
                for cls in owner.classes.values():
                    for entry in cls.entries:
                        if entry.alive:
                            yield entry

    def clear(self) -> list[Any]:
        """Empty the queue; returns the items that waited."""
        items = [e.item for e in self.entries()]
        self._levels.clear()
        self._live = 0
        return items
