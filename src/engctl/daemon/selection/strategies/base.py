"""What every strategy is: the `Strategy` extension point, its `--explain` verdict, and the
state shared by the weighted strategies.

Part of `engctl.daemon.selection` (see its privacy rule): strategies read the candidates'
package-private slots directly, the hot path's one allowance.

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from engctl.protocol import StrategyName

from ..candidates import Candidate, CandidateSet, Change
from ..selector import Selector


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
