"""The autoscaler's decisions (docs/elastic.md): how many instances an engine with `[scale]`
wants now (requests that wait, the share of busy slots, the floors of `min`, the warm pool, a
prewarm and a prediction), when a surplus has lasted `idle_timeout` (decay), which idle
instances go under host memory pressure, and the predictor over the history's 5-minute slots.

Pure: plain values in, decisions out, `now` injected; no process, loop or file (the scaler
gathers the values and carries the decisions out through the fleet). Imports the shared
contract only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engctl.models import ScaleSpec
from engctl.states import ScaleCause

# A float division that lands a hair above a whole number must not ask for one more instance.
_EPSILON = 1e-9


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPSILON))


@dataclass(frozen=True, slots=True)
class Observation:
    """One autoscaled engine now, in plain figures (the scaler reads them off its instances
    and the router's queue)."""

    size: int  # instance slots: ready, on their way, or down
    ready: int  # ready instances (leased ones included)
    in_flight: int  # requests running on instances that no lease holds
    waiting: int  # queued requests this engine could take
    leased: int  # instances a lease holds: busy, whatever they run
    max_concurrency: int = 1
    # How many of the highest slots could go now (idle and not leased, or without a process):
    # instances leave from the top, so that ids stay NAME#0..NAME#n-1.
    removable: int = 0
    floor: int = 0  # a prewarm's or a prediction's floor
    floor_reason: str = ""  # ... and what it is ("prewarm 4 until 14:05:00")
    pressure: bool = False  # host memory is short: no warm spares, no prewarm
    # What the engine's admission gate lets run now (its max_in_flight or adaptive limit;
    # with a rate, those running plus a token each): requests beyond it wait for admission,
    # not for an instance, so they call for none.
    cap: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Resize to `size`; `reason` is the event's text ("scale 2 -> 4: 6 requests waiting,
    4/4 slots busy"), `data` its figures."""

    size: int
    cause: ScaleCause
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


def _slots(obs: Observation) -> str:
    capacity = max(0, obs.ready - obs.leased) * obs.max_concurrency
    return f"{obs.in_flight}/{capacity} slots busy"


def wanted(spec: ScaleSpec, obs: Observation) -> tuple[int, ScaleCause, str]:
    """The instances `obs` calls for (within min..max), what decides it and why in words."""
    mc = obs.max_concurrency
    requests = obs.in_flight + obs.waiting
    if obs.cap is not None:
        requests = min(requests, obs.cap)
    # Enough instances that the busy share stays at or under the target ...
    by_target = _ceil(requests / (mc * spec.target)) + obs.leased
    # ... and never fewer than demand occupies plus the warm spares, nor than a floor.
    demand = _ceil(requests / mc) + obs.leased
    floors: list[tuple[int, str]] = [(spec.min, f"scale.min {spec.min}")]
    if not obs.pressure:
        if spec.min_idle:
            floors.append(
                (demand + spec.min_idle, f"warm pool: {demand} busy + min_idle {spec.min_idle}")
            )
        if obs.floor:
            floors.append((obs.floor, obs.floor_reason or f"floor {obs.floor}"))
    floor, floor_why = max(floors, key=lambda f: f[0])
    want = min(spec.max, max(floor, by_target))
    capped = " (scale.max)" if max(floor, by_target) > spec.max else ""
    if by_target > floor:
        if obs.waiting:
            noun = "request" if obs.waiting == 1 else "requests"
            why = f"{obs.waiting} {noun} waiting, {_slots(obs)}"
            return want, ScaleCause.BURST, why + capped
        share = obs.in_flight / max(1, (obs.ready - obs.leased) * mc)
        why = f"{_slots(obs)} ({share:.0%}, above target {spec.target:.0%})"
        if obs.leased:
            why += f", {obs.leased} leased"
        return want, ScaleCause.TARGET, why + capped
    return want, ScaleCause.FLOOR, floor_why + capped


class EngineScaler:
    """One engine's autoscaling: its decisions, and since when it has had more instances than
    it wants (the idle decay waits `idle_timeout` of that)."""

    def __init__(self, spec: ScaleSpec) -> None:
        self.spec = spec
        self.surplus_since: float | None = None
        self.surplus_peak = 0  # the most instances wanted since the surplus began

    def decide(self, obs: Observation, now: float) -> Decision | None:
        """Grow at once to what is wanted; shrink only once a surplus has lasted
        `idle_timeout`, to the most wanted during it, from the top; else None."""
        spec = self.spec
        want, cause, why = wanted(spec, obs)
        data: dict[str, Any] = {
            "from": obs.size,
            "waiting": obs.waiting,
            "in_flight": obs.in_flight,
            "ready": obs.ready,
            "leased": obs.leased,
            "slots": max(0, obs.ready - obs.leased) * obs.max_concurrency,
        }
        if want > obs.size:
            self.surplus_since = None
            return Decision(want, cause, f"scale {obs.size} -> {want}: {why}", {**data, "to": want})
        if want == obs.size:
            self.surplus_since = None
            return None
        if self.surplus_since is None:
            self.surplus_since, self.surplus_peak = now, want
            return None
        self.surplus_peak = max(self.surplus_peak, want)
        idle_for = now - self.surplus_since
        if idle_for < spec.idle_timeout:
            return None
        # Only the highest slots may go, and only idle (or down) ones: a busy or leased one
        # there holds the count until it is idle (a later look goes on).
        to = max(self.surplus_peak, obs.size - obs.removable)
        if to >= obs.size:
            return None
        if to == self.surplus_peak:
            self.surplus_since = None  # the next step down waits a whole idle_timeout again
        held = f"; #{to - 1} is busy or leased" if to > self.surplus_peak else ""
        reason = (
            f"scale {obs.size} -> {to}: more instances than wanted for {idle_for:.0f}s"
            f" (idle_timeout {spec.idle_timeout:g}s; at most {self.surplus_peak} wanted since:"
            f" {why}){held}"
        )
        return Decision(to, ScaleCause.IDLE, reason, {**data, "to": to, "idle_s": idle_for})


# -- memory pressure ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reclaimable:
    """An idle instance the memory pressure may stop: its engine's highest slot that can go."""

    engine: str
    instance: str
    rss_bytes: int


def reclaim(
    available: int, threshold: int, engines: Mapping[str, Sequence[Reclaimable]]
) -> list[Reclaimable]:
    """The idle instances to stop so that available memory gets back to `threshold`: the
    largest RSS first among the next one each engine can give (its highest removable slot,
    so ids stay dense), until what they hold covers the shortfall. `engines` lists each
    engine's removable instances from its highest slot down, above its `min`."""
    if available >= threshold:
        return []
    heads = dict.fromkeys(engines, 0)
    chosen: list[Reclaimable] = []
    freed = 0
    while available + freed < threshold:
        nexts = [engines[e][i] for e, i in heads.items() if i < len(engines[e])]
        if not nexts:
            break
        best = max(nexts, key=lambda r: (r.rss_bytes, r.instance))
        chosen.append(best)
        freed += best.rss_bytes
        heads[best.engine] += 1
    return chosen


# -- the predictor -------------------------------------------------------------------------------

# The history slots the predictor reads, and how far ahead it looks (the slot that starts within
# the next 5 minutes counts, so the floor rises before a peak, not during it).
SLOT_SECONDS = 300
LOOKAHEAD_SECONDS = 600
DAYS = 7


@dataclass(frozen=True, slots=True)
class DaySlot:
    """What the history says of the same time of day, `days_ago` days back: the peak of
    requests in flight on the engine's instances (None: no history for that time)."""

    days_ago: int
    peak_in_flight: float | None


@dataclass(frozen=True, slots=True)
class Prediction:
    floor: int
    reason: str
    evidence: dict[str, Any]


def predict(days: Sequence[DaySlot], spec: ScaleSpec, max_concurrency: int) -> Prediction | None:
    """The floor a recurring peak calls for: the median of the peaks seen at this time of day
    on the previous days with history (at least two of them), in instances at the target's
    busy share. None when there is too little history or no peak recurs."""
    seen = sorted((d for d in days if d.peak_in_flight is not None), key=lambda d: d.days_ago)
    if len(seen) < 2:
        return None
    peaks = [float(d.peak_in_flight or 0.0) for d in seen]
    import statistics  # here: with fractions and decimal, ~0.8 MiB of the daemon's RSS

    median = statistics.median(peaks)
    floor = min(spec.max, _ceil(median / (max_concurrency * spec.target)))
    if floor <= 0:
        return None
    listed = ", ".join(f"{p:g}" for p in peaks)
    reason = (
        f"predicted {floor}: this time of day (the next {LOOKAHEAD_SECONDS // 60} minutes) peaked"
        f" at {listed} requests in flight on the last {len(seen)} days with history"
        f" (median {median:g}, at target {spec.target:g} × {max_concurrency} per instance)"
    )
    evidence = {"days_ago": [d.days_ago for d in seen], "peaks": peaks, "median": median}
    return Prediction(floor, reason, evidence)
