"""The autoscaler's decisions as plain values with an injected clock (issue 14): a burst grows at
once (to max at most), a steady load keeps its size, a surplus waits idle_timeout before it goes
(decay to the most wanted meanwhile, from the top only), the floors (min, warm pool, prewarm)
hold, memory pressure reclaims the largest idle instances first, and the predictor reads the
same time of previous days."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engctl.daemon.autoscale import (
    DaySlot,
    EngineScaler,
    Observation,
    Reclaimable,
    predict,
    reclaim,
    wanted,
)
from engctl.models import ScaleSpec
from engctl.states import ScaleCause

SPEC = ScaleSpec(min=1, max=8, min_idle=0, target=0.8, idle_timeout=60.0)


def obs(size: int, **figures: int | bool | str | None) -> Observation:
    """An engine of `size` ready, idle instances, with `figures` changed."""
    values: dict[str, object] = {"size": size, "ready": size, "in_flight": 0, "waiting": 0}
    values["leased"] = 0
    values["removable"] = size
    values.update(figures)
    return Observation(**values)  # type: ignore[arg-type]


# -- burst -----------------------------------------------------------------------------------------
def test_a_burst_grows_at_once_saying_how_many_wait_and_how_busy() -> None:
    """Requests that wait scale up in one step, the event's text giving the numbers."""
    scaler = EngineScaler(ScaleSpec(min=1, max=8, target=0.8))
    decision = scaler.decide(obs(2, in_flight=4, waiting=2, max_concurrency=2, removable=0), 0.0)
    assert decision is not None
    assert decision.size == 4
    assert decision.cause is ScaleCause.BURST
    assert decision.reason == "scale 2 -> 4: 2 requests waiting, 4/4 slots busy"
    assert decision.data["waiting"] == 2 and decision.data["to"] == 4


def test_a_burst_larger_than_max_grows_to_max_and_says_so() -> None:
    scaler = EngineScaler(SPEC)
    decision = scaler.decide(obs(1, in_flight=1, waiting=40, removable=0), 0.0)
    assert decision is not None and decision.size == 8
    assert decision.reason.endswith("(scale.max)")


def test_requests_beyond_the_engines_admission_limit_call_for_no_instance() -> None:
    """With `limits.max_in_flight = 2` (or an adaptive limit of 2) only 2 requests run at
    once: 10 waiting ask for the instances 2 keep busy, not for 10 requests' worth."""
    scaler = EngineScaler(ScaleSpec(min=1, max=4, target=1.0))
    capped = obs(1, in_flight=2, waiting=10, max_concurrency=2, removable=0, cap=2)
    assert scaler.decide(capped, 0.0) is None
    assert wanted(ScaleSpec(min=1, max=4, target=1.0), capped)[0] == 1
    uncapped = obs(1, in_flight=2, waiting=10, max_concurrency=2, removable=0)
    assert wanted(ScaleSpec(min=1, max=4, target=1.0), uncapped)[0] == 4
    room = obs(1, in_flight=2, waiting=10, max_concurrency=2, removable=0, cap=6)
    assert wanted(ScaleSpec(min=1, max=4, target=1.0), room)[0] == 3


def test_a_request_waiting_on_an_engine_scaled_to_zero_starts_one() -> None:
    """Scale to zero: nothing runs; one waiting request asks for instances at the target."""
    spec = ScaleSpec(min=0, max=4, target=1.0)
    decision = EngineScaler(spec).decide(obs(0, waiting=1), 0.0)
    assert decision is not None and (decision.size, decision.cause) == (1, ScaleCause.BURST)
    assert decision.reason == "scale 0 -> 1: 1 request waiting, 0/0 slots busy"


def test_a_busy_share_above_target_adds_instances_without_any_wait() -> None:
    decision = EngineScaler(SPEC).decide(obs(4, in_flight=4, removable=0), 0.0)
    assert decision is not None and decision.size == 5
    assert decision.cause is ScaleCause.TARGET
    assert "4/4 slots busy (100%, above target 80%)" in decision.reason


# -- steady ----------------------------------------------------------------------------------------
def test_a_steady_load_at_the_target_keeps_its_size() -> None:
    scaler = EngineScaler(SPEC)
    for t in range(0, 600, 10):
        assert scaler.decide(obs(5, in_flight=4, removable=1), float(t)) is None


# -- idle and decay --------------------------------------------------------------------------------
def test_a_surplus_goes_only_after_idle_timeout() -> None:
    """Idle instances are reclaimed once the surplus has lasted idle_timeout, down to min."""
    scaler = EngineScaler(SPEC)
    assert scaler.decide(obs(4), 100.0) is None
    assert scaler.decide(obs(4), 159.9) is None
    decision = scaler.decide(obs(4), 160.0)
    assert decision is not None
    assert (decision.size, decision.cause) == (1, ScaleCause.IDLE)
    assert "idle_timeout 60s" in decision.reason


def test_demand_during_the_idle_window_restarts_it() -> None:
    scaler = EngineScaler(SPEC)
    assert scaler.decide(obs(4), 0.0) is None
    grown = scaler.decide(obs(4, in_flight=4, removable=0), 30.0)  # wants 5: grows
    assert grown is not None and grown.size == 5
    assert scaler.decide(obs(4), 61.0) is None  # a new surplus began at 61
    assert scaler.decide(obs(4), 120.0) is None
    assert scaler.decide(obs(4), 121.0) is not None


def test_decay_goes_to_the_most_wanted_during_the_window() -> None:
    """A short rise within the window sets how far the decay goes; the next step waits a
    whole idle_timeout again."""
    scaler = EngineScaler(SPEC)
    assert scaler.decide(obs(6), 0.0) is None
    assert scaler.decide(obs(6, in_flight=3, removable=3), 20.0) is None  # wants 4
    decision = scaler.decide(obs(6), 60.0)
    assert decision is not None and decision.size == 4
    assert scaler.decide(obs(4), 61.0) is None
    assert scaler.decide(obs(4), 120.0) is None
    decision = scaler.decide(obs(4), 121.0)
    assert decision is not None and decision.size == 1


def test_decay_takes_only_the_highest_idle_instances() -> None:
    """Ids stay NAME#0..NAME#n-1: a busy or leased top instance holds the size until it is
    idle, then the decay goes on without another idle_timeout."""
    scaler = EngineScaler(SPEC)
    assert scaler.decide(obs(4, removable=0), 0.0) is None
    assert scaler.decide(obs(4, removable=0), 100.0) is None
    decision = scaler.decide(obs(4, removable=1), 101.0)
    assert decision is not None and decision.size == 3
    assert decision.reason.endswith("; #2 is busy or leased")
    decision = scaler.decide(obs(3, removable=3), 102.0)
    assert decision is not None and decision.size == 1


# -- floors ----------------------------------------------------------------------------------------
def test_the_warm_pool_keeps_min_idle_spares_beyond_demand() -> None:
    spec = ScaleSpec(min=0, max=8, min_idle=2, target=1.0)
    want, cause, why = wanted(spec, obs(2, in_flight=1, removable=1))
    assert (want, cause) == (3, ScaleCause.FLOOR)
    assert why == "warm pool: 1 busy + min_idle 2"
    assert wanted(spec, obs(0))[0] == 2


def test_a_lease_counts_as_a_busy_instance() -> None:
    spec = ScaleSpec(min=0, max=8, min_idle=1, target=1.0)
    assert wanted(spec, obs(1, leased=1, removable=0))[0] == 2


def test_a_prewarm_floor_holds_and_memory_pressure_drops_the_spares() -> None:
    spec = ScaleSpec(min=1, max=8, min_idle=1)
    prewarmed = obs(1, floor=5, floor_reason="prewarm 5 until 12:00:00")
    assert wanted(spec, prewarmed) == (5, ScaleCause.FLOOR, "prewarm 5 until 12:00:00")
    pressed = obs(1, floor=5, floor_reason="prewarm 5", pressure=True)
    assert wanted(spec, pressed) == (1, ScaleCause.FLOOR, "scale.min 1")


@given(
    lo=st.integers(0, 10),
    span=st.integers(0, 10),
    min_idle=st.integers(0, 20),
    target=st.floats(0.05, 1.0),
    mc=st.integers(1, 8),
    size=st.integers(0, 30),
    in_flight=st.integers(0, 200),
    waiting=st.integers(0, 200),
    leased=st.integers(0, 10),
    floor=st.integers(0, 30),
    pressure=st.booleans(),
)
def test_what_is_wanted_stays_within_min_and_max(
    lo: int,
    span: int,
    min_idle: int,
    target: float,
    mc: int,
    size: int,
    in_flight: int,
    waiting: int,
    leased: int,
    floor: int,
    pressure: bool,
) -> None:
    """Whatever the figures, min <= wanted <= max, and never below demand + min_idle when
    max allows and memory is not short."""
    spec = ScaleSpec(
        min=lo, max=max(1, lo + span), min_idle=min(min_idle, lo + span), target=target
    )
    o = obs(
        size,
        in_flight=in_flight,
        waiting=waiting,
        leased=leased,
        max_concurrency=mc,
        floor=floor,
        pressure=pressure,
    )
    want, _, _ = wanted(spec, o)
    assert spec.min <= want <= spec.max
    demand = -(-(in_flight + waiting) // mc) + leased
    if not pressure:
        assert want >= min(spec.max, demand + spec.min_idle, spec.max)


# -- memory pressure -------------------------------------------------------------------------------
MiB = 1024 * 1024


def test_memory_pressure_reclaims_the_largest_idle_instances_first() -> None:
    """Across engines the largest RSS goes first; within one, from its highest slot down;
    it stops once the shortfall is covered."""
    offers = {
        "a": [Reclaimable("a", "a#3", 50 * MiB), Reclaimable("a", "a#2", 400 * MiB)],
        "b": [Reclaimable("b", "b#1", 300 * MiB), Reclaimable("b", "b#0", 10 * MiB)],
    }
    chosen = reclaim(100 * MiB, 600 * MiB, offers)
    assert [r.instance for r in chosen] == ["b#1", "a#3", "a#2"]
    assert reclaim(700 * MiB, 600 * MiB, offers) == []


def test_memory_pressure_stops_when_nothing_idle_is_left() -> None:
    offers = {"a": [Reclaimable("a", "a#1", MiB)], "b": []}
    assert [r.instance for r in reclaim(0, 10**12, offers)] == ["a#1"]


# -- the predictor ---------------------------------------------------------------------------------
def test_the_predictor_raises_the_floor_for_a_recurring_peak_and_names_its_evidence() -> None:
    spec = ScaleSpec(min=0, max=8, target=0.5)
    days = [DaySlot(1, 6.0), DaySlot(2, 5.0), DaySlot(3, 6.0), DaySlot(4, None), DaySlot(5, 0.0)]
    found = predict(days, spec, max_concurrency=2)
    assert found is not None
    assert found.floor == 6  # median 5.5 requests / (2 × 0.5)
    assert "6, 5, 6, 0 requests in flight on the last 4 days" in found.reason
    assert found.evidence["days_ago"] == [1, 2, 3, 5]


def test_the_predictor_needs_two_days_of_history_and_a_peak() -> None:
    spec = ScaleSpec(min=0, max=8)
    assert predict([DaySlot(1, 9.0), DaySlot(2, None)], spec, 1) is None
    assert predict([DaySlot(1, 0.0), DaySlot(2, 0.0), DaySlot(3, 4.0)], spec, 1) is None
    capped = predict([DaySlot(1, 100.0), DaySlot(2, 100.0)], spec, 1)
    assert capped is not None and capped.floor == 8
