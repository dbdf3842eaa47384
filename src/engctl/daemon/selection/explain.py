"""What a selection says for itself: why nothing qualified (`diagnose`), every candidate's
line for `--explain`, and the messages, with lists kept short on a large fleet.

Part of `engctl.daemon.selection` (see its privacy rule). Runs on the error and `--explain`
paths only: it may scan the whole pool.

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engctl.errors import NoEligibleEngineError
from engctl.protocol import StrategyName

from .candidates import Candidate, CandidateSet
from .selector import FilterName, Selector
from .strategies.base import Strategy, _load_note

# Lists in messages stay readable on a fleet of a thousand instances.
_MAX_LISTED = 12


class Outcome(StrEnum):
    """What a selection came to: a pick, a wait (every match is full) or an error."""

    PICKED = "picked"
    ALL_FULL = "all_full"
    NO_MATCH = "no_match"


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
    if selector.lease is not None:
        # A lease's request goes to its instance while the lease holds it, and nowhere else.
        if c.lease != selector.lease:
            return FilterName.LEASE, f"not held by lease {selector.lease}"
        return None
    if not c._eligible:
        return FilterName.ELIGIBILITY, c.ineligible_reason or "not eligible"
    return None


def diagnose(
    selector: Selector,
    everyone: Mapping[str, Candidate],
    by_type: Mapping[str, Mapping[str, Candidate]],
    by_engine: Mapping[str, Mapping[str, Candidate]],
) -> NoMatch:
    """Which filter leaves nothing for `selector` among `everyone` (by id, with the pool's
    indexes by type and by engine), listing what exists (scans: the error path)."""
    pool = list(everyone.values())
    if not pool:
        return NoMatch(None, "no dispatchable instances are registered")
    if selector.type is not None:
        narrowed = [c for c in pool if c._type == selector.type]
        if not narrowed:
            types = sorted(by_type)
            return NoMatch(
                FilterName.TYPE,
                f"no engine of type {selector.type!r} (types: {_listed(types)})",
                tuple(types),
            )
        pool = narrowed
    if selector.engine is not None:
        narrowed = [c for c in pool if c._engine == selector.engine]
        if not narrowed:
            named = by_engine.get(selector.engine)
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
            found = everyone.get(selector.instance)
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
                f"no instance{scope} has {noun} {', '.join(wanted)} (labels seen: {_listed(seen)})"
            )
            return NoMatch(FilterName.LABEL, msg, tuple(seen))
        pool = narrowed
    why = [f"{c._id}: {c.ineligible_reason or 'not eligible'}" for c in pool]
    noun = "instance matches" if len(pool) == 1 else "instances match"
    msg = f"no eligible instance{scope}: {len(pool)} {noun} but none is eligible ({_listed(why)})"
    return NoMatch(FilterName.ELIGIBILITY, msg, tuple(c._id for c in pool))


def explain(
    selector: Selector,
    name: StrategyName,
    strategy: Strategy,
    everyone: Iterable[Candidate],
    members: CandidateSet | None,
    winner: Candidate | None,
    outcome: Outcome,
    reason: str,
) -> Explanation:
    """Every candidate of `everyone` with the filter that excluded it, or its note, factors and
    score from `strategy` (which picked `winner` from `members`), and why it won."""
    verdict = None
    if members is not None and selector.instance is None:
        verdict = strategy.describe(members, selector, winner)
    lines = []
    for c in everyone:
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
