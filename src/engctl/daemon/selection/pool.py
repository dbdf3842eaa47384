"""The pool of every dispatchable instance, indexed for selection, and `select`: one request's
decision (a pick, a wait, or no match with the reason).

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from engctl.errors import UsageError
from engctl.protocol import StrategyName

from .candidates import Candidate, CandidateSet, Clock, FilterKey, KeyMemory, _matches_key
from .explain import Explanation, NoMatch, Outcome, _scope, diagnose, exclusion, explain
from .selector import Selector
from .strategies import default_strategies
from .strategies.base import Strategy


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
        return diagnose(selector, self._all, self._by_type, self._by_engine)

    def _explain(
        self,
        selector: Selector,
        name: StrategyName,
        members: CandidateSet | None,
        winner: Candidate | None,
        outcome: Outcome,
        reason: str,
    ) -> Explanation:
        strategy = self.strategies[name]
        everyone = self._all.values()
        return explain(selector, name, strategy, everyone, members, winner, outcome, reason)
