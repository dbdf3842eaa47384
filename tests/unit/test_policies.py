"""Unit tests of the failure policies (docs/policies.md) as pure decisions: every method takes
`now`, so each test drives a policy with plain numbers. No process, no event loop, no sleep."""

from __future__ import annotations

import collections
import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.daemon.backoff import CrashTracker
from engctl.daemon.policies import (
    MIB,
    SLOW_START_MIN,
    Action,
    CpuWatch,
    Decision,
    FailureTracker,
    HealthChange,
    HealthTracker,
    MemoryWatch,
    PolicyState,
    SlowTracker,
    Standing,
    guard_rail,
    hang_suspected,
    hang_verdict,
    peer_median,
    slow_start_factor,
)
from engctl.models import BackoffSpec, HealthSpec, RestartSpec
from engctl.policy_config import (
    CpuPolicy,
    CrashPolicy,
    FailingPolicy,
    MemoryPolicy,
    SlowPolicy,
)
from engctl.states import Eligibility, Health

H = Health


# --- health checks (unresponsive) ---------------------------------------------------------


def probe(
    tracker: HealthTracker, spec: HealthSpec, results: str, start: float = 1.0
) -> list[HealthChange | None]:
    """Feed results spelled as a string ("p" pass, "f" fail), one a second from `start`."""
    return [
        tracker.observe(r == "p", start + i, spec, detail="" if r == "p" else "timeout after 2s")
        for i, r in enumerate(results)
    ]


def test_health_unknown_becomes_healthy_after_exactly_success_threshold_passes() -> None:
    """success_threshold - 1 passes change nothing; the next one makes it healthy."""
    spec = HealthSpec(success_threshold=3)
    t = HealthTracker()
    *before, change = probe(t, spec, "ppp")
    assert before == [None, None]
    assert change == HealthChange(H.UNKNOWN, H.HEALTHY, "3 passing probe(s) (success_threshold 3)")
    assert t.state is H.HEALTHY


def test_health_unknown_becomes_unhealthy_after_exactly_failure_threshold_failures() -> None:
    """failure_threshold - 1 failures change nothing; the next one makes it unhealthy, and the
    reason says the count, the threshold and what the last probe saw."""
    spec = HealthSpec(failure_threshold=3)
    t = HealthTracker()
    *before, change = probe(t, spec, "fff")
    assert before == [None, None]
    assert change is not None
    assert (change.old, change.new) == (H.UNKNOWN, H.UNHEALTHY)
    assert change.reason == "3 failed probe(s) (failure_threshold 3); last: timeout after 2s"
    assert t.last_detail == "timeout after 2s"


def test_health_a_pass_resets_the_failure_count() -> None:
    """Failures must be in a row: f f p f f is two runs of two, not four failures."""
    spec = HealthSpec(failure_threshold=3, success_threshold=5)
    t = HealthTracker()
    assert probe(t, spec, "ffpff") == [None] * 5
    assert t.state is H.UNKNOWN
    assert t.failures == 2
    # The third failure in a row is the one that counts.
    change = t.observe(False, 10.0, spec)
    assert change is not None and change.new is H.UNHEALTHY


def test_health_a_failure_resets_the_pass_count() -> None:
    """Passes must be in a row too: p f p is one pass, so one more is needed for threshold 2."""
    spec = HealthSpec(failure_threshold=3, success_threshold=2)
    t = HealthTracker()
    assert probe(t, spec, "pfp") == [None] * 3
    assert t.state is H.UNKNOWN
    change = t.observe(True, 10.0, spec)
    assert change is not None and change.new is H.HEALTHY


def test_health_healthy_tolerates_fewer_than_failure_threshold_failures() -> None:
    """A healthy instance stays healthy through short runs of failures."""
    spec = HealthSpec(failure_threshold=3, success_threshold=1)
    t = HealthTracker()
    probe(t, spec, "p")
    assert t.state is H.HEALTHY
    assert probe(t, spec, "ffpff", start=2.0) == [None] * 5
    assert t.state is H.HEALTHY
    change = t.observe(False, 20.0, spec)
    assert change is not None and (change.old, change.new) == (H.HEALTHY, H.UNHEALTHY)


def test_health_unhealthy_recovers_through_recovering() -> None:
    """unhealthy → recovering on the first pass → healthy after success_threshold passes in
    a row (the pass that started recovering counts)."""
    spec = HealthSpec(failure_threshold=2, success_threshold=3)
    t = HealthTracker()
    probe(t, spec, "ff")
    assert t.state is H.UNHEALTHY
    first, second, third = probe(t, spec, "ppp", start=10.0)
    assert first == HealthChange(
        H.UNHEALTHY, H.RECOVERING, "1 passing probe(s) (success_threshold 3)"
    )
    assert second is None
    assert third == HealthChange(
        H.RECOVERING, H.HEALTHY, "3 passing probe(s) (success_threshold 3)"
    )


def test_health_a_failure_while_recovering_is_unhealthy_at_once() -> None:
    """Recovering is on probation: one failure is enough, whatever failure_threshold says."""
    spec = HealthSpec(failure_threshold=5, success_threshold=3)
    t = HealthTracker()
    probe(t, spec, "fffff")
    probe(t, spec, "pp", start=10.0)
    assert t.state is H.RECOVERING
    change = t.observe(False, 20.0, spec, detail="exit status 1")
    assert change is not None
    assert (change.old, change.new) == (H.RECOVERING, H.UNHEALTHY)
    assert change.reason == "1 failed probe(s) (failure_threshold 5); last: exit status 1"


def test_health_success_threshold_one_goes_from_unhealthy_straight_to_healthy() -> None:
    """With success_threshold 1 the single pass that ends unhealthy is already enough, so
    recovering is skipped (the thresholds allow it; nothing is left to wait for)."""
    spec = HealthSpec(failure_threshold=1, success_threshold=1)
    t = HealthTracker()
    probe(t, spec, "f")
    change = t.observe(True, 5.0, spec)
    assert change is not None and (change.old, change.new) == (H.UNHEALTHY, H.HEALTHY)


def test_health_results_in_the_grace_period_do_not_count() -> None:
    """Before started_at + grace nothing is counted, not even toward a later threshold."""
    spec = HealthSpec(failure_threshold=2, grace=10.0)
    t = HealthTracker(started_at=100.0)
    for now in (100.0, 105.0, 109.99):
        assert t.observe(False, now, spec, detail="refused") is None
    assert (t.state, t.failures, t.last_detail) == (H.UNKNOWN, 0, "")
    # The grace period ends at exactly started_at + grace: from then on results count.
    assert t.observe(False, 110.0, spec) is None
    change = t.observe(False, 111.0, spec)
    assert change is not None and change.new is H.UNHEALTHY


def test_health_reset_forgets_everything_and_restarts_the_grace_period() -> None:
    """A new process: unknown again, counts cleared, grace measured from the reset."""
    spec = HealthSpec(failure_threshold=1, grace=5.0)
    t = HealthTracker()
    t.observe(False, 10.0, spec)
    assert t.state is H.UNHEALTHY
    t.reset(50.0)
    assert (t.state, t.passes, t.failures, t.started_at) == (H.UNKNOWN, 0, 0, 50.0)
    # One tuple: mypy would keep `t.state` narrowed to UNHEALTHY across the calls.
    assert (t.observe(False, 54.0, spec), t.state) == (None, H.UNKNOWN)


# Every edge the tracker may take; UNHEALTHY → HEALTHY only when success_threshold is 1.
HEALTH_EDGES = {
    (H.UNKNOWN, H.HEALTHY),
    (H.UNKNOWN, H.UNHEALTHY),
    (H.HEALTHY, H.UNHEALTHY),
    (H.UNHEALTHY, H.RECOVERING),
    (H.RECOVERING, H.HEALTHY),
    (H.RECOVERING, H.UNHEALTHY),
}


@settings(max_examples=300, deadline=None)
@given(
    results=st.lists(st.booleans(), max_size=60),
    failure_threshold=st.integers(1, 5),
    success_threshold=st.integers(1, 5),
)
def test_health_never_skips_a_state_the_thresholds_forbid(
    results: list[bool], failure_threshold: int, success_threshold: int
) -> None:
    """Over any sequence of results: only legal edges, healthy only after success_threshold
    passes in a row, unhealthy from unknown/healthy only after failure_threshold failures in a
    row, and a run of either length always ends in that state."""
    spec = HealthSpec(failure_threshold=failure_threshold, success_threshold=success_threshold)
    t = HealthTracker()
    seen: list[bool] = []
    for i, passed in enumerate(results):
        before = t.state
        change = t.observe(passed, float(i), spec)
        seen.append(passed)
        if change is None:
            assert t.state is before
            continue
        assert change.old is before and change.new is t.state
        edge = (change.old, change.new)
        assert edge in HEALTH_EDGES or (edge == (H.UNHEALTHY, H.HEALTHY) and success_threshold == 1)
        if change.new is H.HEALTHY:
            assert seen[-success_threshold:] == [True] * success_threshold
        if change.new is H.UNHEALTHY and change.old is not H.RECOVERING:
            assert seen[-failure_threshold:] == [False] * failure_threshold
        if change.new is H.UNHEALTHY:
            assert not passed
    if len(seen) >= success_threshold and seen[-success_threshold:] == [True] * success_threshold:
        assert t.state is H.HEALTHY
    if len(seen) >= failure_threshold and seen[-failure_threshold:] == [False] * failure_threshold:
        assert t.state is H.UNHEALTHY


# --- crash, flapping ------------------------------------------------------------------------

NO_FLAP = CrashPolicy(flap_max_restarts=1_000_000)


def exit_(
    t: CrashTracker,
    now: float,
    *,
    uptime: float = 5.0,
    quick: bool = False,
    restart: RestartSpec | None = None,
    crash: CrashPolicy = NO_FLAP,
) -> Decision:
    """One unexpected exit, by default a non-quick one that does not reset the backoff."""
    return t.on_exit(now, uptime, quick, "exit status 1", restart or RestartSpec(), crash)


def test_crash_backoff_doubles_from_initial_and_is_capped_at_max() -> None:
    """Default backoff: 0.5, 1, 2, 4, 8, 16, then max 30 for good."""
    t = CrashTracker()
    decisions = [exit_(t, 100.0 * i) for i in range(9)]
    assert {d.action for d in decisions} == {Action.RESTART}
    assert [d.delay for d in decisions] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [d.data["attempt"] for d in decisions] == list(range(1, 10))
    assert decisions[0].reason == "exit status 1; restart in 0.5s (attempt 1)"


def test_crash_backoff_follows_the_spec_numbers() -> None:
    """initial, factor and max come from the engine's restart.backoff."""
    restart = RestartSpec(backoff=BackoffSpec(initial=1.0, factor=3.0, max=20.0))
    t = CrashTracker()
    assert [exit_(t, 100.0 * i, restart=restart).delay for i in range(5)] == [1, 3, 9, 20, 20]


def test_crash_backoff_resets_after_uptime_of_reset_after() -> None:
    """A process that stayed up reset_after seconds starts the backoff over; a shorter one
    keeps climbing."""
    t = CrashTracker()
    assert [exit_(t, 100.0 * i).delay for i in range(4)] == [0.5, 1, 2, 4]
    assert exit_(t, 500.0, uptime=59.9).delay == 8
    reset = exit_(t, 600.0, uptime=60.0)
    assert (reset.delay, reset.data["attempt"]) == (0.5, 1)
    assert exit_(t, 700.0).delay == 1


def test_crash_delay_stays_at_max_after_a_thousand_restarts() -> None:
    """An engine that crashes after some seconds, forever, never flaps (the backoff spaces the
    restarts) so its attempt count keeps growing: the delay must stay at max, not overflow
    (2.0 ** 1024 raises OverflowError)."""
    t = CrashTracker()
    now = 0.0
    for _ in range(1100):
        d = exit_(t, now, crash=CrashPolicy())
        assert d.action is Action.RESTART
        assert d.delay <= 30.0
        now += d.delay + 10.0
    assert d.delay == 30.0
    assert d.data["attempt"] == 1100


def test_crash_is_fatal_after_max_retries_quick_failures() -> None:
    """max_retries failed starts are retried; the next one gives up, and the reason says so."""
    restart = RestartSpec(max_retries=3)
    t = CrashTracker()
    retried = [exit_(t, float(i), quick=True, restart=restart) for i in range(3)]
    assert [d.action for d in retried] == [Action.RESTART] * 3
    fatal = exit_(t, 3.0, quick=True, restart=restart)
    assert fatal.action is Action.FATAL
    assert fatal.reason == "gave up after 4 failed starts (max_retries 3): exit status 1"


def test_crash_max_retries_zero_gives_up_on_the_first_failed_start() -> None:
    restart = RestartSpec(max_retries=0)
    assert exit_(CrashTracker(), 0.0, quick=True, restart=restart).action is Action.FATAL


def test_crash_only_quick_exits_count_toward_max_retries() -> None:
    """An exit after start_seconds is a crash, not a failed start: max_retries does not apply
    (flapping and backoff do)."""
    restart = RestartSpec(max_retries=0)
    t = CrashTracker()
    assert all(exit_(t, 100.0 * i, restart=restart).action is Action.RESTART for i in range(5))


def test_crash_started_forgives_failed_starts_but_not_the_backoff() -> None:
    """Once a process stays up start_seconds its failed starts no longer count; the backoff
    still climbs until reset_after of uptime."""
    restart = RestartSpec(max_retries=2)
    t = CrashTracker()
    first = [exit_(t, float(i), quick=True, restart=restart) for i in range(2)]
    t.started()
    again = [exit_(t, 10.0 + i, quick=True, restart=restart) for i in range(2)]
    assert {d.action for d in first + again} == {Action.RESTART}
    assert [d.delay for d in first + again] == [0.5, 1, 2, 4]
    assert exit_(t, 20.0, quick=True, restart=restart).action is Action.FATAL


def test_crash_flapping_is_fatal_when_restarts_crowd_the_window() -> None:
    """flap_max_restarts restarts within flap_window: the next exit gives up."""
    crash = CrashPolicy(flap_window=60.0, flap_max_restarts=3)
    t = CrashTracker()
    assert [exit_(t, now, crash=crash).action for now in (0.0, 10.0, 20.0)] == [Action.RESTART] * 3
    d = exit_(t, 30.0, crash=crash)
    assert d.action is Action.FATAL
    assert d.reason == ("flapping: 3 restarts in the last 60s (flap_max_restarts 3): exit status 1")
    assert d.data == {"restarts_in_window": 3}


def test_crash_spread_out_restarts_never_flap() -> None:
    """The same number of restarts, spread wider than the window, is not flapping."""
    crash = CrashPolicy(flap_window=60.0, flap_max_restarts=3)
    t = CrashTracker()
    assert all(exit_(t, 30.0 * i, crash=crash).action is Action.RESTART for i in range(50))


def test_crash_a_restart_exactly_flap_window_ago_has_left_the_window() -> None:
    crash = CrashPolicy(flap_window=60.0, flap_max_restarts=2)
    t = CrashTracker()
    exit_(t, 0.0, crash=crash)
    exit_(t, 30.0, crash=crash)
    assert exit_(t, 59.9, crash=crash).action is Action.FATAL
    t2 = CrashTracker()
    exit_(t2, 0.0, crash=crash)
    exit_(t2, 30.0, crash=crash)
    assert exit_(t2, 60.0, crash=crash).action is Action.RESTART


def test_crash_reset_gives_a_fresh_budget() -> None:
    """Started by hand (or after the cool-down): backoff, failed starts and flapping forgotten."""
    restart = RestartSpec(max_retries=1)
    crash = CrashPolicy(flap_window=60.0, flap_max_restarts=5)
    t = CrashTracker()
    exit_(t, 0.0, quick=True, restart=restart, crash=crash)
    assert exit_(t, 1.0, quick=True, restart=restart, crash=crash).action is Action.FATAL
    t.reset()
    d = exit_(t, 2.0, quick=True, restart=restart, crash=crash)
    assert (d.action, d.delay, d.data["attempt"]) == (Action.RESTART, 0.5, 1)


def test_hang_is_suspected_only_past_hang_timeout() -> None:
    """Issue 10.6: only a request unanswered for the engine's hang_timeout gets the instance
    pinged; how short its caller's deadline was plays no part."""
    assert not hang_suspected([], 60.0)
    assert not hang_suspected([("r-1", 3.0), ("r-2", 59.9)], 60.0)
    assert hang_suspected([("r-1", 3.0), ("r-2", 60.0)], 60.0)


def test_hang_verdict_kills_when_the_ping_goes_unanswered_too() -> None:
    """Issue 10.6: an overdue request and no answer to ping: kill, naming the request, how
    long it waited, hang_timeout and the ping timeout."""
    d = hang_verdict([("r-41", 12.0), ("r-42", 61.25)], 60.0, 2.0, False, 4)
    assert d is not None and d.action is Action.KILL
    assert d.reason == (
        "hang: request r-42 unanswered for 61.2s (hang_timeout 60s) and no answer to ping within 2s"
    )
    assert d.data == {"request_id": "r-42", "unanswered_seconds": 61.25}


def test_hang_verdict_spares_a_busy_worker_that_answers_ping() -> None:
    """Issue 10.6: a worker that answers ping with a free slot left is busy, not hung; with
    every slot held by overdue requests nothing else can run there: drain and restart."""
    assert hang_verdict([("r-1", 70.0)], 60.0, 2.0, True, 2) is None
    assert hang_verdict([("r-1", 5.0)], 60.0, 2.0, False, 1) is None  # nothing overdue
    d = hang_verdict([("r-1", 70.0), ("r-2", 65.0)], 60.0, 2.0, True, 2)
    assert d is not None and d.action is Action.DRAIN_RESTART
    assert d.reason.startswith("hang: all 2 of its slots are held by requests unanswered for")
    assert d.data == {"stuck_requests": 2}


# --- memory ---------------------------------------------------------------------------------

LEAKY = MemoryPolicy(leak_window=60.0, leak_rate=1 * MIB)


def feed_rss(
    w: MemoryWatch,
    rss_at: list[tuple[float, int]],
    policy: MemoryPolicy = LEAKY,
    max_rss: int | None = None,
) -> list[Decision | None]:
    return [w.observe(now, rss, max_rss, policy) for now, rss in rss_at]


def test_memory_over_max_rss_drains_and_restarts() -> None:
    """Above max_rss (not at it) → drain and restart, with both figures in the reason."""
    w = MemoryWatch()
    assert w.observe(0.0, 512 * MIB, 512 * MIB, LEAKY) is None
    d = w.observe(1.0, 600 * MIB, 512 * MIB, LEAKY)
    assert d is not None and d.action is Action.DRAIN_RESTART
    assert d.reason == "memory: RSS 600.0 MiB is above max_rss 512.0 MiB"
    assert d.data == {"rss_bytes": 600 * MIB, "max_rss": 512 * MIB}


def test_memory_steady_climb_is_a_leak_with_its_rate_in_the_reason() -> None:
    """10 MiB/s for a whole window (sampled each second) → drain and restart; nothing before
    the window is 90 % full."""
    w = MemoryWatch()
    decisions = feed_rss(w, [(float(t), 100 * MIB + 10 * MIB * t) for t in range(61)])
    first = next(i for i, d in enumerate(decisions) if d is not None)
    assert first == 54  # 0.9 × leak_window of samples
    d = decisions[first]
    assert d is not None and d.action is Action.DRAIN_RESTART
    assert d.reason == ("memory leak: RSS grew 540.0 MiB in 54s (10.0 MiB/s, leak_rate 1.0 MiB/s)")
    assert d.data["rate_bytes_s"] == 10 * MIB
    assert d.data["growth_bytes"] == 540 * MIB


def test_memory_the_same_growth_in_one_jump_is_not_a_leak() -> None:
    """A one-off allocation of 600 MiB (what the leak above grows in a minute) is not steady."""
    w = MemoryWatch()
    samples = [(float(t), 100 * MIB + (600 * MIB if t >= 30 else 0)) for t in range(121)]
    assert feed_rss(w, samples) == [None] * 121


def test_memory_flat_rss_is_not_a_leak() -> None:
    w = MemoryWatch()
    assert feed_rss(w, [(float(t), 300 * MIB) for t in range(200)]) == [None] * 200


def test_memory_no_leak_decision_while_the_window_is_not_full() -> None:
    """50 s of a steep climb in a 60 s window is not yet evidence; neither are four samples
    that span the whole window."""
    w = MemoryWatch()
    assert feed_rss(w, [(float(t), 100 * MIB + 50 * MIB * t) for t in range(51)]) == [None] * 51
    sparse = MemoryWatch()
    four = [(t, 100 * MIB + 50 * MIB * int(t)) for t in (0.0, 20.0, 40.0, 60.0)]
    assert feed_rss(sparse, four) == [None] * 4


def test_memory_leak_rate_zero_turns_leak_detection_off_but_not_max_rss() -> None:
    off = replace(LEAKY, leak_rate=0)
    w = MemoryWatch()
    assert (
        feed_rss(w, [(float(t), 100 * MIB + 10 * MIB * t) for t in range(120)], off) == [None] * 120
    )
    d = w.observe(120.0, 2000 * MIB, 1024 * MIB, off)
    assert d is not None and d.action is Action.DRAIN_RESTART


def test_memory_keeps_only_the_window_of_samples() -> None:
    """Old samples leave the window (memory stays bounded, old growth is forgotten); reset
    empties it for a new process."""
    w = MemoryWatch()
    feed_rss(w, [(float(t), 100 * MIB) for t in range(500)])
    assert len(w.samples) == 61
    assert w.samples[0][0] == 499.0 - 60.0
    w.reset()
    assert not w.samples


class _DequeWatch(MemoryWatch):
    """MemoryWatch as it was: its samples in a deque of tuples (the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples = collections.deque()  # type: ignore[assignment]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.1, 5.0), st.integers(-50 * MIB, 60 * MIB), st.booleans()),
        max_size=400,
    ),
    window=st.sampled_from([5.0, 60.0, 600.0]),
)
def test_memory_window_in_arrays_decides_as_the_deque_did(
    steps: list[tuple[float, int, bool]], window: float
) -> None:
    """The samples kept in two arrays (16 bytes each, was some 70 as tuples in a deque: 4.3 MiB
    at 1,000 instances for a 60 s window) give every decision, reason and figure the deque
    gave, through resets (a new process) too."""
    policy = MemoryPolicy(leak_window=window, leak_rate=1 * MIB)
    new, old = MemoryWatch(), _DequeWatch()
    now, rss = 0.0, 100 * MIB
    for dt, change, reset in steps:
        if reset and now > 0 and change % 7 == 0:
            new.reset()
            old.reset()
            old.samples = collections.deque()  # type: ignore[assignment]
        now += dt
        rss = max(rss + change, 0)
        got = new.observe(now, rss, 900 * MIB, policy)
        assert got == old.observe(now, rss, 900 * MIB, policy)
        assert len(new.samples) == len(old.samples)
        assert [new.samples[i] for i in (0, -1)] == [old.samples[0], old.samples[-1]]


# --- CPU ------------------------------------------------------------------------------------


def test_cpu_sustained_above_the_limit_for_the_window_restarts() -> None:
    """Above max_cpu_percent in every sample for `window` seconds → a drain and restart (the
    watch runs for action "restart" only: "alert", the default, is the built-in cpu rule)."""
    w = CpuWatch()
    policy = CpuPolicy(window=30.0, action="restart")
    decisions = [w.observe(float(t), 95.0 + (t == 7) * 2, 90.0, policy) for t in range(31)]
    assert decisions[:30] == [None] * 30
    d = decisions[30]
    assert d is not None and d.action is Action.DRAIN_RESTART
    assert d.reason == "cpu: above max_cpu_percent 90% for 30s (peak 97%)"
    assert d.data == {"cpu_percent": 95.0, "max_cpu_percent": 90.0}


def test_cpu_action_restart_drains_and_restarts() -> None:
    w = CpuWatch()
    policy = CpuPolicy(window=10.0, action="restart")
    decisions = [w.observe(float(t), 150.0, 100.0, policy) for t in range(11)]
    assert decisions[-1] is not None and decisions[-1].action is Action.DRAIN_RESTART


def test_cpu_a_dip_to_or_below_the_limit_resets_the_window() -> None:
    """One sample at the limit (not above it) starts the count over."""
    w = CpuWatch()
    policy = CpuPolicy(window=30.0)
    for t in range(21):
        assert w.observe(float(t), 95.0, 90.0, policy) is None
    assert w.observe(21.0, 90.0, 90.0, policy) is None
    for t in range(22, 52):
        assert w.observe(float(t), 95.0, 90.0, policy) is None
    assert w.observe(52.0, 95.0, 90.0, policy) is not None


def test_cpu_fires_once_per_window_while_it_stays_high() -> None:
    w = CpuWatch()
    policy = CpuPolicy(window=30.0)
    fired = [t for t in range(100) if w.observe(float(t), 99.0, 90.0, policy) is not None]
    assert fired == [30, 60, 90]


def test_cpu_without_a_limit_never_decides() -> None:
    w = CpuWatch()
    assert all(w.observe(float(t), 800.0, None, CpuPolicy(window=1.0)) is None for t in range(9))


# --- slow: latency against peers ------------------------------------------------------------


def test_peer_median_leaves_the_instance_itself_out() -> None:
    lat = {"a#0": 100.0, "a#1": 10.0, "a#2": 20.0, "b#0": 30.0}
    assert peer_median("a#0", lat) == 20.0
    assert peer_median("a#1", lat) == 30.0
    assert peer_median("x", {"x": 5.0}) is None
    assert peer_median("x", {}) is None


SLOW = SlowPolicy(threshold=3.0, min_requests=20, min_latency_ms=1.0, downweight=0.5, floor=0.05)


def test_slow_downweights_when_ewma_exceeds_threshold_times_peer_median() -> None:
    t = SlowTracker()
    d = t.evaluate(0.0, 40.0, 20, 10.0, SLOW)
    assert d is not None and d.action is Action.DOWNWEIGHT
    assert d.reason == (
        "slow: latency EWMA 40.00 ms is 4.0× its peers' median 10.00 ms (threshold 3×):"
        " weight × 0.50"
    )
    assert d.data == {"from": 1.0, "to": 0.5}
    assert t.multiplier == 0.5


def test_slow_at_or_below_threshold_times_median_is_not_slow() -> None:
    t = SlowTracker()
    assert t.evaluate(0.0, 30.0, 100, 10.0, SLOW) is None
    assert t.multiplier == 1.0


def test_slow_needs_min_requests_since_the_last_change() -> None:
    """19 requests are too few to judge; 20 are enough; after a change, 20 fresh ones again."""
    t = SlowTracker()
    assert t.evaluate(0.0, 40.0, 19, 10.0, SLOW) is None
    assert t.evaluate(1.0, 40.0, 20, 10.0, SLOW) is not None
    assert t.evaluate(10.0, 40.0, 39, 10.0, SLOW) is None
    assert t.evaluate(11.0, 40.0, 40, 10.0, SLOW) is not None
    assert t.multiplier == 0.25


def test_slow_multiplier_halves_each_restore_interval_down_to_the_floor() -> None:
    """Still slow with enough requests: one step per restore_interval, floor reached, never
    passed, and no more decisions once there."""
    t = SlowTracker()
    changes: list[tuple[float, float]] = []
    for i in range(40):
        now = 0.5 * i
        if t.evaluate(now, 50.0, 100 * (i + 1), 10.0, SLOW) is not None:
            changes.append((now, t.multiplier))
    assert [m for _, m in changes] == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.05])
    assert [now for now, _ in changes] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert t.multiplier == 0.05


def test_slow_restores_step_by_step_while_latency_is_normal() -> None:
    """From the floor back to full weight, one step per restore_interval."""
    t = SlowTracker()
    t.multiplier, t.last_change = 0.05, 0.0
    steps: list[tuple[float, Decision]] = []
    for i in range(1, 40):
        now = 0.5 * i
        d = t.evaluate(now, 10.0, 10 * i, 10.0, SLOW)
        if d is not None:
            steps.append((now, d))
    assert [d.action for _, d in steps] == [Action.RESTORE_WEIGHT] * 5
    assert [d.data["to"] for _, d in steps] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert [now for now, _ in steps] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert steps[0][1].reason.startswith("latency normal again (latency EWMA 10.00 ms is 1.0×")
    assert t.multiplier == 1.0


def test_slow_restore_without_fresh_requests_says_so() -> None:
    """No requests since the change and latency normal: a step back to probe it."""
    t = SlowTracker()
    t.multiplier, t.last_change, t.requests_at_change = 0.25, 0.0, 7
    d = t.evaluate(5.0, 10.0, 7, 10.0, SLOW)
    assert d is not None
    assert d.reason == "no recent requests to judge: weight back a step (× 0.50)"


def test_slow_no_decision_without_peers_or_latency() -> None:
    """Slow is relative: alone, or without a measured EWMA, there is nothing to compare."""
    t = SlowTracker()
    assert t.evaluate(0.0, 500.0, 1000, None, SLOW) is None
    assert t.evaluate(1.0, None, 1000, 10.0, SLOW) is None
    assert t.multiplier == 1.0


def test_slow_min_latency_ms_ignores_sub_millisecond_noise() -> None:
    """0.9 ms against peers' 0.2 ms is 4.5× but within min_latency_ms: not slow. 1.3 ms is
    more than min_latency_ms above the median and over 3×: slow."""
    t = SlowTracker()
    assert t.evaluate(0.0, 0.9, 100, 0.2, SLOW) is None
    d = t.evaluate(1.0, 1.3, 100, 0.2, SLOW)
    assert d is not None and d.action is Action.DOWNWEIGHT


def test_slow_policy_disabled_restores_full_weight_at_once() -> None:
    """Turning the policy off gives the whole weight back at once, not step by step, and does
    not wait for restore_interval."""
    t = SlowTracker()
    t.multiplier, t.last_change = 0.125, 10.0
    off = replace(SLOW, enabled=False)
    d = t.evaluate(10.1, 500.0, 0, 10.0, off)
    assert d is not None and d.action is Action.RESTORE_WEIGHT
    assert d.reason == "slow policy off"
    assert d.data == {"from": 0.125, "to": 1.0}
    assert t.evaluate(20.0, 500.0, 1000, 10.0, off) is None


def test_slow_downweight_one_never_announces_a_change_that_is_none() -> None:
    """downweight = 1 is valid (range (0, 1]) but lowers nothing: no "weight × 1.00" event
    every restore_interval for as long as the instance stays slow."""
    t = SlowTracker()
    one = replace(SLOW, downweight=1.0)
    assert [t.evaluate(10.0 * i, 50.0, 100 * (i + 1), 10.0, one) for i in range(5)] == [None] * 5
    assert t.multiplier == 1.0


def test_slow_downweight_set_to_one_while_downweighted_gives_the_weight_back() -> None:
    """Stepping back by ÷1 would restore nothing forever (one event per restore_interval,
    weight stuck): the first step back restores it fully."""
    t = SlowTracker()
    t.multiplier, t.last_change = 0.25, 0.0
    d = t.evaluate(5.0, 10.0, 100, 10.0, replace(SLOW, downweight=1.0))
    assert d is not None and d.action is Action.RESTORE_WEIGHT
    assert d.data == {"from": 0.25, "to": 1.0}
    assert t.evaluate(10.0, 10.0, 200, 10.0, replace(SLOW, downweight=1.0)) is None


def test_slow_reset_is_full_weight() -> None:
    t = SlowTracker()
    t.evaluate(0.0, 50.0, 100, 10.0, SLOW)
    t.reset()
    assert (t.multiplier, t.requests_at_change) == (1.0, 0)


# --- failing: consecutive errors, error rate, isolation ------------------------------------

FAILING = FailingPolicy(
    consecutive_errors=5,
    error_rate=0.5,
    min_requests=20,
    window=30.0,
    isolation_base=30.0,
    isolation_max=300.0,
)


def test_failing_consecutive_errors_trip_at_the_bound() -> None:
    f = FailureTracker()
    assert f.on_errors(4, "boom", FAILING) is None
    d = f.on_errors(5, "boom", FAILING)
    assert d is not None and d.action is Action.ISOLATE
    assert d.reason == "5 consecutive errors (last: boom)"
    assert d.data == {"consecutive_errors": 5}


def test_failing_error_rate_over_the_bound_isolates() -> None:
    f = FailureTracker()
    assert f.on_tick(0.0, 0, 0, FAILING) is None
    d = f.on_tick(1.0, 9, 11, FAILING)
    assert d is not None and d.action is Action.ISOLATE
    assert d.reason == ("error rate 55% over 20 requests in 30s (at or above 50%, min_requests 20)")
    assert d.data == {"error_rate": 0.55, "requests": 20}


def test_failing_error_rate_needs_min_requests() -> None:
    """19 errors out of 19 requests is too little volume; the 20th request tips it."""
    f = FailureTracker()
    assert f.on_tick(1.0, 0, 19, FAILING) is None
    assert f.on_tick(2.0, 0, 20, FAILING) is not None


def test_failing_error_rate_at_the_bound_trips() -> None:
    """The bound is inclusive: a worker failing every 2nd request is isolated at 50 %."""
    f = FailureTracker()
    assert f.on_tick(1.0, 10, 10, FAILING) is not None
    assert FailureTracker().on_tick(1.0, 11, 9, FAILING) is None


def test_failing_old_counts_leave_the_window() -> None:
    """15 errors at t=1 and 10 successes at t=32 never meet in one 30 s window: each alone is
    under min_requests (together they would be 60 % of 25)."""
    f = FailureTracker()
    assert f.on_tick(1.0, 0, 15, FAILING) is None
    assert f.on_tick(32.0, 10, 15, FAILING) is None
    assert [(ok, err) for _, ok, err in f.window] == [(10, 0)]


def test_failing_counters_going_backwards_add_nothing() -> None:
    """Running totals that restart lower (new stats) give no negative counts."""
    f = FailureTracker()
    f.on_tick(1.0, 50, 5, FAILING)
    assert f.on_tick(2.0, 3, 1, FAILING) is None
    assert [(ok, err) for _, ok, err in f.window] == [(50, 5)]
    f.on_tick(3.0, 3, 20, FAILING)
    assert [(ok, err) for _, ok, err in f.window] == [(50, 5), (0, 19)]


def test_failing_isolation_length_grows_base_times_n_and_is_capped() -> None:
    policy = replace(FAILING, isolation_base=30.0, isolation_max=100.0)
    f = FailureTracker()
    lengths = []
    for i in range(6):
        lengths.append(f.isolation_length(policy))
        f.isolated(float(i))
    assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]


def test_failing_isolated_starts_the_window_afresh() -> None:
    """The counts that caused an isolation do not isolate it again on its return."""
    f = FailureTracker()
    assert f.on_tick(1.0, 0, 25, FAILING) is not None
    f.isolated(1.0)
    assert f.on_tick(2.0, 0, 25, FAILING) is None
    assert f.isolations == 1


def test_failing_isolations_fade_after_quiet_periods() -> None:
    """One isolation less counts for each isolation_max seconds without one."""
    f = FailureTracker()
    f.isolated(0.0)
    f.isolated(0.0)
    assert f.isolation_length(FAILING) == 90.0
    f.on_tick(299.0, 0, 0, FAILING)
    assert f.isolations == 2
    f.on_tick(300.0, 0, 0, FAILING)
    assert (f.isolations, f.isolation_length(FAILING)) == (1, 60.0)
    f.on_tick(599.0, 0, 0, FAILING)
    assert f.isolations == 1
    f.on_tick(600.0, 0, 0, FAILING)
    assert (f.isolations, f.isolation_length(FAILING)) == (0, 30.0)
    f.on_tick(10_000.0, 0, 0, FAILING)
    assert f.isolations == 0


# --- slow start, guard rail -----------------------------------------------------------------


def test_slow_start_ramps_linearly_from_a_ten_percent_floor_to_full() -> None:
    assert SLOW_START_MIN == 0.1
    assert slow_start_factor(100.0, 100.0, 30.0) == 0.1
    assert slow_start_factor(101.5, 100.0, 30.0) == 0.1  # 5 % of the way: still the floor
    assert slow_start_factor(106.0, 100.0, 30.0) == pytest.approx(0.2)
    assert slow_start_factor(115.0, 100.0, 30.0) == pytest.approx(0.5)
    assert slow_start_factor(127.0, 100.0, 30.0) == pytest.approx(0.9)
    assert slow_start_factor(130.0, 100.0, 30.0) == 1.0
    assert slow_start_factor(500.0, 100.0, 30.0) == 1.0


def test_slow_start_off_without_a_start_or_a_window() -> None:
    assert slow_start_factor(100.0, None, 30.0) == 1.0
    assert slow_start_factor(100.0, 100.0, 0.0) == 1.0


@given(st.floats(0, 1000), st.floats(0, 1000), st.floats(0.001, 1000))
def test_slow_start_is_within_bounds_and_never_decreases(a: float, b: float, window: float) -> None:
    lo, hi = sorted((a, b))
    f_lo, f_hi = slow_start_factor(lo, 0.0, window), slow_start_factor(hi, 0.0, window)
    assert SLOW_START_MIN <= f_lo <= f_hi <= 1.0


@pytest.mark.parametrize(
    ("serving", "isolated", "percent", "expected"),
    [
        (4, 0, 50.0, (True, 2)),
        (4, 1, 50.0, (True, 2)),
        (4, 2, 50.0, (False, 2)),  # the third would pass 50 % of 4
        (5, 2, 50.0, (False, 2)),  # 2.5 rounds down
        (1, 0, 50.0, (True, 1)),  # a lone bad instance may still be taken out
        (1, 1, 50.0, (False, 1)),
        (10, 0, 0.0, (True, 1)),  # 0 % still lets one go (the small-cluster trap)
        (10, 1, 0.0, (False, 1)),
        (3, 2, 100.0, (True, 3)),
        (10, 2, 30.0, (True, 3)),  # 30 % of 10 is exactly 3 despite float rounding
    ],
)
def test_guard_rail_caps_isolations_at_a_share_but_always_allows_one(
    serving: int, isolated: int, percent: float, expected: tuple[bool, int]
) -> None:
    assert guard_rail(serving, isolated, percent) == expected


# --- standing: eligibility and effective weight --------------------------------------------


def everything_wrong() -> Standing:
    """A standing with every reason to hold an instance back set at once."""
    return Standing(
        manual=Eligibility.DRAINING,
        manual_reason="deploy",
        draining_reason="memory: RSS above max_rss",
        isolated_until=500.0,
        isolation_reason="5 consecutive errors",
        unhealthy_isolated=True,
        health_reason="3 failed probe(s)",
        slow_multiplier=0.5,
        slow_start_since=90.0,
    )


def test_standing_resolve_priority_from_manual_drain_down_to_active() -> None:
    """Each reason hides all below it: manual drain > manual isolate > policy drain > timed
    isolation > unhealthy > downweighted (slow, slow start) > active."""
    s = everything_wrong()
    assert s.resolve(100.0, 2.0, 30.0) == (Eligibility.DRAINING, "by hand: deploy", 0.0, None)
    s.manual, s.manual_reason = Eligibility.ISOLATED, "investigating"
    assert s.resolve(100.0, 2.0, 30.0) == (
        Eligibility.ISOLATED,
        "by hand: investigating",
        0.0,
        None,
    )
    s.manual = None
    assert s.resolve(100.0, 2.0, 30.0) == (
        Eligibility.DRAINING,
        "memory: RSS above max_rss",
        0.0,
        None,
    )
    s.draining_reason = ""
    assert s.resolve(100.0, 2.0, 30.0) == (
        Eligibility.ISOLATED,
        "5 consecutive errors",
        0.0,
        500.0,
    )
    s.isolated_until = None
    assert s.resolve(100.0, 2.0, 30.0) == (Eligibility.ISOLATED, "3 failed probe(s)", 0.0, None)
    s.unhealthy_isolated = False
    elig, reason, weight, until = s.resolve(105.0, 2.0, 30.0)
    assert (elig, until) == (Eligibility.DOWNWEIGHTED, None)
    assert reason == "slow (× 0.50), slow start after isolation (50%)"
    assert weight == pytest.approx(2.0 * 0.5 * 0.5)
    s.slow_multiplier = 1.0
    s.slow_start_since = None
    assert s.resolve(105.0, 2.0, 30.0) == (Eligibility.ACTIVE, "", 2.0, None)


def test_standing_downweighted_by_slow_alone() -> None:
    s = Standing(slow_multiplier=0.25)
    assert s.resolve(0.0, 4.0, 30.0) == (Eligibility.DOWNWEIGHTED, "slow (× 0.25)", 1.0, None)


def test_standing_slow_start_alone_ramps_the_weight_and_ends_itself() -> None:
    """A returning instance ramps up; once the ramp is done the standing forgets it."""
    s = Standing(slow_start_since=100.0)
    eligibility, reason, weight, until = s.resolve(100.0, 2.0, 30.0)
    assert (eligibility, reason, until) == (
        Eligibility.DOWNWEIGHTED,
        "slow start after isolation (10%)",
        None,
    )
    assert weight == pytest.approx(0.2)
    assert s.resolve(130.0, 2.0, 30.0) == (Eligibility.ACTIVE, "", 2.0, None)
    assert s.slow_start_since is None


def test_standing_timed_isolation_is_not_lifted_by_resolve() -> None:
    """resolve reports the isolation even past its end: lifting it (after a probe, docs/policies.md)
    is the enforcer's move, which clears isolated_until."""
    s = Standing(isolated_until=50.0, isolation_reason="error rate")
    assert s.resolve(60.0, 1.0, 30.0)[0] is Eligibility.ISOLATED


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.0, 5.0), st.booleans(), st.integers(0, 50)),
        max_size=60,
    ),
    weight=st.floats(0.01, 1000.0),
    floor=st.sampled_from([0.01, 0.05, 0.3, 1.0]),
    downweight=st.sampled_from([0.1, 0.5, 0.9]),
    since_ago=st.one_of(st.none(), st.floats(0.0, 100.0)),
)
def test_effective_weight_stays_between_floor_times_slow_start_floor_and_weight(
    steps: list[tuple[float, bool, int]],
    weight: float,
    floor: float,
    downweight: float,
    since_ago: float | None,
) -> None:
    """Whatever latencies the slow policy sees, its multiplier stays in [floor, 1], and the
    effective weight of an instance that is not held back stays in
    [floor × weight × 10 %, weight]."""
    policy = replace(SLOW, floor=floor, downweight=downweight)
    t = SlowTracker()
    now, requests = 0.0, 0
    for dt, slow, more in steps:
        now += dt
        requests += more
        t.evaluate(now, 80.0 if slow else 10.0, requests, 10.0, policy)
        assert floor <= t.multiplier <= 1.0
    since = None if since_ago is None else now - since_ago
    s = Standing(slow_multiplier=t.multiplier, slow_start_since=since)
    elig, _, eff, _ = s.resolve(now, weight, 30.0)
    assert elig in (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)
    assert floor * weight * SLOW_START_MIN * (1 - 1e-9) <= eff <= weight
    assert (elig is Eligibility.ACTIVE) == (eff == weight)


def test_policy_state_starts_afresh_for_a_new_process() -> None:
    """`starting` (issue 11: the enforcer's reset, no longer the supervisor's): health,
    memory, CPU and latency measurements and a drain's reason are forgotten; isolations, a
    manual override and the error window carry over to the new process."""
    st = PolicyState()
    st.health.state = Health.UNHEALTHY
    st.memory.samples.append((1.0, 100))
    st.cpu.over_since = 3.0
    st.slow.multiplier = 0.25
    st.standing.slow_multiplier = 0.25
    st.standing.draining_reason = "draining to restart: memory"
    st.standing.manual = Eligibility.ISOLATED
    st.failures.isolated(5.0)
    st.new_process(now=50.0)
    assert st.health.state is Health.UNKNOWN and st.health.started_at == 50.0
    assert not st.memory.samples and st.cpu.over_since is None
    assert st.slow.multiplier == 1.0 and st.standing.slow_multiplier == 1.0
    assert st.standing.draining_reason == ""
    assert st.standing.manual is Eligibility.ISOLATED
    assert st.failures.isolations == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.2, 3.0), st.integers(0, 4 * 1024 * MIB)), min_size=2, max_size=200
    ),
    st.floats(1e3, 1e7),
)
def test_leak_fit_running_sums_match_the_least_squares_slope(
    steps: list[tuple[float, int]], start: float
) -> None:
    """Issue 13.1: the leak policy's slope, kept as running sums (O(1) per sample), is the
    least-squares slope of the samples in its window, however long the clock has run."""
    w = MemoryWatch()
    now = start
    for dt, rss in steps:
        now += dt
        w.observe(now, rss, None, LEAKY)
        pts = list(w.samples)
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        var = sum((p[0] - mx) ** 2 for p in pts)
        expected = sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var > 0 else 0.0
        rising = sum(1 for a, b in itertools.pairwise(pts) if b[1] > a[1])
        assert w._fit.slope() == pytest.approx(expected, rel=1e-6, abs=1.0)
        assert w._rising == rising
