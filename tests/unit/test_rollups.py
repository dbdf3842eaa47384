"""Unit tests of the metrics roll-ups' bookkeeping, without processes or a daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from engctl.daemon.metrics import Rollups, _Base, _Readings
from engctl.histogram import Histogram
from engctl.states import EngineMode


@dataclass
class _Spec:
    mode: EngineMode = EngineMode.SERVICE


@dataclass
class _Engine:
    instances: list[object]
    spec: _Spec = field(default_factory=_Spec)


@dataclass
class _Sup:
    engines: dict[str, _Engine]


def test_rollups_forget_the_figures_of_instances_that_left() -> None:
    """An instance that left the fleet (scaled down, unregistered, replaced) keeps no figures
    in any bucket: they would keep its whole object graph alive, for ever in `bases_before`."""
    sup = _Sup({})
    rollups = Rollups(cast("Any", sup), cast("Any", None), None, clock=lambda: 0.0)
    stays, leaves = object(), object()
    sup.engines["e"] = _Engine([stays, leaves])
    base = _Base(0, 0, 0, 0, 0, 0, 0, Histogram(), {})
    for tier in rollups.tiers:
        for member in (stays, leaves):
            m = cast("Any", member)
            tier.bases[m] = tier.bases_before[m] = base
            tier.readings[m] = _Readings(1, 2.0, 3.0, 1)
    rollups.previous = {cast("Any", m): base for m in (stays, leaves)}
    assert rollups.forget_gone() == 0  # nothing left yet

    sup.engines["e"].instances.remove(leaves)
    assert rollups.forget_gone() == 1
    for tier in rollups.tiers:
        for figures in (tier.bases, tier.bases_before, tier.readings):
            assert list(figures) == [stays]
    assert list(rollups.previous) == [stays]
