"""Admission control as pure code: the token bucket, the gates and caps, the wait queue (priority
with aging, fair queuing between callers, shortest expected job first) and the adaptive
gradient controller. No daemon, no process: time is passed in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.admission_config import DaemonLimits, RateLimit, TypeLimits
from engctl.daemon.admission import (
    Admission,
    EngineLimits,
    GradientController,
    GradientParams,
    Phase,
    TokenBucket,
    WaitQueue,
    acquire,
    passes,
    release,
)
from engctl.daemon.admission.queue import TOP_PRIORITY
from engctl.models import LimitsSpec


# -- the bucket -----------------------------------------------------------------------------
def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    b = TokenBucket(10.0, 3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.has_token(0.05)
    assert b.take(0.1)  # one token in 1/10 s
    assert b.level(100.0) == 3.0  # never more than the burst


def test_bucket_wait_counts_the_requests_ahead() -> None:
    b = TokenBucket(4.0, 1, now=0.0)
    assert b.take(0.0)
    assert b.wait(0.0) == 0.25
    assert b.wait(0.0, ahead=3) == 1.0  # the fourth token from now


@given(st.lists(st.floats(0, 0.5), min_size=1, max_size=200))
def test_bucket_never_admits_more_than_burst_plus_rate_times_time(gaps: list[float]) -> None:
    """Whatever the arrival times, admissions over [0, t] <= burst + rate * t."""
    rate, burst = 20.0, 5
    b = TokenBucket(rate, burst, 0.0)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        taken += b.take(now)
        assert taken <= burst + rate * now + 1e-9


# -- gates and caps -------------------------------------------------------------------------
def _engine(
    cap: int | None = None, rate: float | None = None, adaptive: bool = False
) -> EngineLimits:
    return EngineLimits("onnx", LimitsSpec(rate=rate, max_in_flight=cap, adaptive=adaptive), 8)


def test_no_limits_means_admission_is_inactive() -> None:
    adm = Admission(DaemonLimits(), 0.0)
    adm.configure(DaemonLimits(), {"a": EngineLimits("onnx", LimitsSpec(), 4)}, 0.0)
    assert not adm.active
    assert adm.route_gates("a", "onnx") == ()


def test_caps_global_type_and_engine_each_close_their_gate() -> None:
    limits = DaemonLimits(max_in_flight=3, types={"onnx": TypeLimits(max_in_flight=2)})
    adm = Admission(limits, 0.0)
    adm.configure(limits, {"a": _engine(cap=1), "b": _engine()}, 0.0)
    assert adm.active
    to_a, to_b = adm.route_gates("a", "onnx"), adm.route_gates("b", "onnx")
    assert passes(to_a, 0.0) is None
    acquire(to_a, 0.0)
    assert passes(to_a, 0.0) is adm.engines["a"]  # engine cap 1
    assert passes(to_b, 0.0) is None
    acquire(to_b, 0.0)
    assert passes(to_b, 0.0) is adm.types["onnx"]  # type cap 2
    release(to_a)
    assert passes(to_a, 0.0) is None
    other = adm.route_gates("c", "kv")
    acquire(other, 0.0)
    acquire(to_a, 0.0)
    assert passes(other, 0.0) is adm.global_gate  # global cap 3


def test_reconfigure_keeps_counts_and_tokens_of_gates_that_stay() -> None:
    adm = Admission()
    adm.configure(DaemonLimits(), {"a": _engine(cap=4, rate=10)}, 0.0)
    gate = adm.engines["a"]
    acquire(adm.route_gates("a", "onnx"), 0.0)
    adm.configure(DaemonLimits(), {"a": _engine(cap=2, rate=10)}, 0.0)
    assert adm.engines["a"] is gate and gate.in_flight == 1 and gate.cap == 2
    assert gate.bucket is not None and gate.bucket.level(0.0) == 9.0


def test_caller_gate_comes_from_its_table_or_the_star_one() -> None:
    from engctl.admission_config import CallerLimits

    limits = DaemonLimits(
        callers={"team-a": CallerLimits(RateLimit(5, 5), 2.0), "*": CallerLimits(RateLimit(1, 1))}
    )
    adm = Admission(limits, 0.0)
    assert adm.active
    a = adm.caller_gate("team-a", 0.0)
    x = adm.caller_gate("someone", 0.0)
    assert a is not None and a.bucket is not None and a.bucket.rate == 5 and a.weight == 2.0
    assert x is not None and x is not a and x.bucket is not None and x.bucket.rate == 1
    assert adm.caller_weight("team-a") == 2.0 and adm.caller_weight("someone") == 1.0


# -- the wait queue ---------------------------------------------------------------------------
def _drain(q: WaitQueue) -> list[object]:
    out = []
    while (e := q.take()) is not None:
        q.served(e)
        out.append(e.item)
    return out


def test_higher_priority_is_served_first() -> None:
    q = WaitQueue(aging=10.0)
    q.push("low", 2, "", 0.0, "k")
    q.push("high", 8, "", 1.0, "k")
    q.push("normal", 5, "", 0.5, "k")
    assert _drain(q) == ["high", "normal", "low"]


def test_aging_lets_an_old_low_priority_request_go_before_a_new_high_one() -> None:
    q = WaitQueue(aging=1.0)
    q.push("old-low", 2, "", 0.0, "k")
    q.push("new-high", 8, "", 6.5, "k")  # arrived more than (8 - 2) x aging later
    assert _drain(q) == ["old-low", "new-high"]


def test_callers_of_one_level_are_served_round_robin() -> None:
    q = WaitQueue()
    for i in range(6):
        q.push(f"a{i}", 5, "a", 0.0 + i * 0.001, "k")
    q.push("b0", 5, "b", 0.01, "k")
    q.push("b1", 5, "b", 0.011, "k")
    assert _drain(q) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_weighted_fair_queuing_gives_a_heavier_caller_its_share() -> None:
    q = WaitQueue()
    for i in range(20):
        q.push(("a", i), 5, "a", i * 0.001, "k", weight=3.0)
        q.push(("b", i), 5, "b", i * 0.001, "k", weight=1.0)
    first = [item for item in _drain(q)[:12] if isinstance(item, tuple)]
    assert sum(1 for who, _ in first if who == "a") == 9  # 3 : 1


def test_shortest_expected_job_first_within_a_caller() -> None:
    q = WaitQueue()
    q.push("long", 5, "", 0.0, "slow-type", expected=5.0)
    q.push("short", 5, "", 0.1, "fast-type", expected=0.01)
    assert _drain(q) == ["short", "long"]


def test_blocked_classes_are_skipped_and_put_back_in_place() -> None:
    q = WaitQueue()
    q.push("x1", 5, "", 0.0, "x")
    q.push("y1", 5, "", 0.1, "y")
    q.push("x2", 5, "", 0.2, "x")
    e = q.take()
    assert e is not None and e.item == "x1"
    q.put_back([e])
    e = q.take(lambda key: key == "x")
    assert e is not None and e.item == "y1"
    q.served(e)
    assert _drain(q) == ["x1", "x2"]


def test_discarded_entries_are_never_served() -> None:
    q = WaitQueue()
    gone = q.push("gone", 5, "", 0.0, "k")
    q.push("kept", 5, "", 0.1, "k")
    assert q.discard(gone) and not q.discard(gone)
    assert len(q) == 1
    assert _drain(q) == ["kept"]
    q.tidy()
    assert not q


arrivals = st.lists(
    st.tuples(st.floats(0, 3), st.integers(0, TOP_PRIORITY), st.sampled_from("abc")),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300)
@given(arrivals, st.lists(st.integers(0, 3), min_size=1, max_size=60))
def test_no_request_waits_beyond_the_aging_bound(
    pushes: list[tuple[float, int, str]], serves: list[int]
) -> None:
    """Under any arrival sequence, the level served next holds the request with the earliest
    aged arrival (arrival - priority x aging): a request of priority p is passed by another
    level's requests only if they arrived less than (q - p) x aging after it, so once it has
    waited (TOP_PRIORITY - p) x aging nothing that arrives later goes first (no starvation);
    within its level, fair queuing serves it within one round of the level's callers."""
    aging = 0.5
    q = WaitQueue(aging)
    now = 0.0
    steps = iter(serves)
    for gap, prio, caller in pushes:
        now += gap
        q.push((now, prio), prio, caller, now, ("k", caller))
        for _ in range(next(steps, 1)):
            waiting = [w.item for w in q.entries()]
            e = q.take()
            if e is None:
                assert not waiting
                break
            q.served(e)
            p = e.priority
            mine = min(a - p * aging for a, wp in waiting if wp == p)
            for a, wp in waiting:
                if wp != p:
                    assert mine <= a - wp * aging + 1e-9


def test_a_low_priority_request_is_served_within_the_bound_under_a_high_flood() -> None:
    """A backlog of high-priority requests that never empties (one arrives for each one
    served): without aging the low one would wait forever; with it, it is served once the
    requests of the first (8 - 2) x aging seconds are (here: by then, plus the backlog)."""
    aging = 0.5
    q = WaitQueue(aging)
    backlog = 5
    for i in range(backlog):
        q.push(("high", -i), 8, "web", 0.0, "k")
    q.push("low", 2, "batch", 0.0, "k")
    served_at = None
    for step in range(1, 200):
        now = step * 0.1
        q.push(("high", step), 8, "web", now, "k")
        e = q.take()
        assert e is not None
        q.served(e)
        if e.item == "low":
            served_at = now
            break
    assert served_at is not None and served_at <= (8 - 2) * aging + (backlog + 1) * 0.1 + 1e-9


# -- the gradient controller ----------------------------------------------------------------------
def _closed_loop(knee: int, base_ms: float, steps: int = 4000) -> GradientController:
    """Drive a controller with an engine that answers in `base_ms` up to `knee` requests in
    flight and queues beyond it (latency grows with in-flight / knee): an overloaded engine
    always has `limit` requests in flight."""
    ctl = GradientController(0.0, GradientParams(max_limit=200, min_rtt_interval=1e9))
    now = 0.0
    for _ in range(steps):
        in_flight = ctl.limit
        latency = base_ms * max(1.0, in_flight / knee)
        now += 0.01
        ctl.sample(latency, now)
    return ctl


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 80), st.floats(1.0, 50.0))
def test_gradient_converges_to_the_knee_of_the_latency_curve(knee: int, base_ms: float) -> None:
    ctl = _closed_loop(knee, base_ms)
    assert ctl.phase is Phase.STEADY
    assert ctl.min_rtt_ms is not None and abs(ctl.min_rtt_ms - base_ms) < 1e-6
    # The fixed point of limit = L*g + sqrt(L*g) with g = 1.1*knee/L: just above the knee.
    ceiling = 1.1 * knee + (1.1 * knee) ** 0.5 + 2
    assert knee <= ctl.limit <= ceiling, (knee, ctl.limit, ctl.reason)


def test_gradient_measures_first_then_reports_why_it_moved() -> None:
    ctl = GradientController(0.0, GradientParams(max_limit=50, min_rtt_requests=5))
    assert ctl.limit == 1 and ctl.phase.value == "measuring"
    for i in range(5):
        ctl.sample(10.0, i * 0.01)
    assert ctl.phase is Phase.STEADY and ctl.min_rtt_ms == 10.0
    now = 1.0
    for _ in range(10):
        now += 0.2
        for _ in range(5):
            ctl.sample(10.0, now)
    assert ctl.limit > 1 and "gradient" in ctl.reason
    doc = ctl.to_json(now, 1000.0)
    assert doc["limit"] == ctl.limit and doc["phase"] == "steady" and doc["reason"] == ctl.reason


def test_gradient_never_exceeds_the_engine_capacity() -> None:
    ctl = _closed_loop(knee=500, base_ms=5.0)
    assert ctl.limit <= 200
    ctl.set_max(10)
    assert ctl.limit <= 10


def test_a_newcomer_does_not_take_a_token_from_requests_waiting_for_it() -> None:
    """A token that came while requests of the same or a higher priority wait for it is theirs:
    for a request not waiting yet the bucket counts as closed; a higher priority passes."""
    adm = Admission()
    adm.configure(DaemonLimits(), {"a": _engine(rate=10)}, 0.0)
    gates = adm.route_gates("a", "onnx")
    gate = adm.engines["a"]
    gate.waiting[5] = 1  # one request of priority 5 waits for this bucket
    assert passes(gates, 0.0) is None  # a token is there (for the waiting one)
    assert passes(gates, 0.0, fresh=5) is gate
    assert passes(gates, 0.0, fresh=2) is gate
    assert passes(gates, 0.0, fresh=8) is None
