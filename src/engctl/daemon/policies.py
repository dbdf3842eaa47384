"""Failure policies as pure decisions over observations (docs/policies.md).

Nothing here touches a process, the event loop or the clock: every method takes `now`, so a
test drives a policy with plain numbers. `daemon.enforcer` feeds the observations in and
carries out what comes back; each decision carries the reason a person reads in `events`.

Imports the shared contract only: no daemon module, no process, no loop.
"""

from __future__ import annotations

import array
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engctl.models import HealthSpec
from engctl.policy_config import (
    CpuPolicy,
    FailingPolicy,
    MemoryPolicy,
    SlowPolicy,
)
from engctl.states import DrainCause, Eligibility, Health

MIB = 1024 * 1024
# A returning instance starts at this share of its weight and ramps up over `slow_start`.
SLOW_START_MIN = 0.1


class Action(StrEnum):
    """What a policy asks the daemon to do."""

    RESTART = "restart"  # after the exit of a crashed process: start again after `delay`
    FATAL = "fatal"  # give up until a person (or the cool-down) starts it again
    KILL = "kill"  # kill the process group now (hang); the exit is then handled as a crash
    DRAIN_RESTART = "drain_restart"  # take no new requests, let in-flight finish, restart
    ISOLATE = "isolate"  # no dispatch until a time
    DOWNWEIGHT = "downweight"  # lower the effective weight
    RESTORE_WEIGHT = "restore_weight"  # raise it back a step


@dataclass(frozen=True)
class Decision:
    """One action with its reason and the figures behind it; a drain and restart names its
    `cause` (recorded in the `instance.draining` event, which `report` reads)."""

    action: Action
    reason: str
    delay: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    cause: DrainCause | None = None


def fmt_bytes(n: float) -> str:
    """Bytes as MiB with one decimal (policy reasons)."""
    return f"{n / MIB:.1f} MiB"


# -- health checks (unresponsive) ------------------------------------------------------------
@dataclass(frozen=True)
class HealthChange:
    """Health moved from `old` to `new` because of `reason`."""

    old: Health
    new: Health
    reason: str


class HealthTracker:
    """Kubernetes-style thresholds over probe results.

    unknown → healthy after `success_threshold` passes in a row, → unhealthy after
    `failure_threshold` failures in a row; unhealthy → recovering on a pass; recovering →
    healthy after `success_threshold` passes in a row, → unhealthy again on any failure.
    Results before the grace period ends do not count.
    """

    __slots__ = ("failures", "last_detail", "passes", "started_at", "state")

    def __init__(self, started_at: float = 0.0) -> None:
        self.state = Health.UNKNOWN
        self.passes = 0
        self.failures = 0
        self.started_at = started_at
        self.last_detail = ""

    def observe(
        self, passed: bool, now: float, spec: HealthSpec, detail: str = ""
    ) -> HealthChange | None:
        """Count one probe result; return the change it causes, if any."""
        if now < self.started_at + spec.grace:
            return None
        self.last_detail = detail
        old = self.state
        if passed:
            self.passes += 1
            self.failures = 0
            if old is Health.UNHEALTHY:
                new = Health.HEALTHY if self.passes >= spec.success_threshold else Health.RECOVERING
            elif old in (Health.UNKNOWN, Health.RECOVERING):
                new = Health.HEALTHY if self.passes >= spec.success_threshold else old
            else:
                new = old
            why = f"{self.passes} passing probe(s) (success_threshold {spec.success_threshold})"
        else:
            self.failures += 1
            self.passes = 0
            if old is Health.RECOVERING or (
                old in (Health.UNKNOWN, Health.HEALTHY)
                and (self.failures >= spec.failure_threshold)
            ):
                new = Health.UNHEALTHY
            else:
                new = old
            why = f"{self.failures} failed probe(s) (failure_threshold {spec.failure_threshold})"
            if detail:
                why += f"; last: {detail}"
        if new is old:
            return None
        self.state = new
        return HealthChange(old, new, why)

    def reset(self, now: float) -> None:
        """A new process: health is unknown again and the grace period restarts."""
        self.__init__(now)  # type: ignore[misc]


# -- hang ------------------------------------------------------------------------------------
def hang_suspected(unanswered: Sequence[tuple[str, float]], hang_timeout: float) -> bool:
    """Whether a request has gone unanswered for `hang_timeout` seconds: then the instance
    is pinged (`hang_verdict` judges the answer). `unanswered` is (request id, age) of the
    requests in flight on it; a caller's own deadline plays no part."""
    return any(age >= hang_timeout for _id, age in unanswered)


def hang_verdict(
    unanswered: Sequence[tuple[str, float]],
    hang_timeout: float,
    ping_timeout: float,
    ping_answered: bool,
    max_concurrency: int,
) -> Decision | None:
    """Judge an instance with requests unanswered for `hang_timeout` after a ping.

    No answer to the ping either: hung (KILL, the exit is then a crash). It answers, but
    every one of its slots is held by such a request (an async worker stuck on them): nothing
    else can ever run there (DRAIN_RESTART). Otherwise it is busy, not hung: None.
    """
    overdue = [(rid, age) for rid, age in unanswered if age >= hang_timeout]
    if not overdue:
        return None
    if not ping_answered:
        rid, age = max(overdue, key=lambda x: x[1])
        return Decision(
            Action.KILL,
            f"hang: request {rid} unanswered for {age:.1f}s (hang_timeout {hang_timeout:g}s)"
            f" and no answer to ping within {ping_timeout:g}s",
            data={"request_id": rid, "unanswered_seconds": round(age, 3)},
        )
    if len(overdue) >= max_concurrency:
        return Decision(
            Action.DRAIN_RESTART,
            f"hang: all {len(overdue)} of its slots are held by requests unanswered for over"
            f" {hang_timeout:g}s (hang_timeout; it answers ping, but not them)",
            data={"stuck_requests": len(overdue)},
            cause=DrainCause.HANG,
        )
    return None


# -- memory and CPU --------------------------------------------------------------------------
class MemoryWatch:
    """RSS over `max_rss`, or a steady climb over `leak_window` (a leak).

    The least-squares fit over the window is kept as running sums, updated as samples come
    and go: O(1) per sample, whatever the window holds (a fleet's samples each second add up).
    """

    __slots__ = ("_fit", "_rising", "samples")

    def __init__(self) -> None:
        self.samples = _Samples()
        self._fit = _RunningFit()
        self._rising = 0  # steps between consecutive samples in the window that went up

    def observe(
        self, now: float, rss: int, max_rss: int | None, policy: MemoryPolicy
    ) -> Decision | None:
        """Add one RSS sample; decide when the instance must be drained and restarted."""
        samples = self.samples
        if samples and rss > samples[-1][1]:
            self._rising += 1
        samples.append((now, rss))
        self._fit.add(now, rss)
        # One sample at or before the window's start is kept, so the span covers the whole
        # window whatever the sampling period.
        while len(samples) > 1 and samples[1][0] <= now - policy.leak_window:
            t, y = samples.popleft()
            if samples[0][1] > y:
                self._rising -= 1
            self._fit.remove(t, y)
        if max_rss is not None and rss > max_rss:
            return Decision(
                Action.DRAIN_RESTART,
                f"memory: RSS {fmt_bytes(rss)} is above max_rss {fmt_bytes(max_rss)}",
                data={"rss_bytes": rss, "max_rss": max_rss},
                cause=DrainCause.MEMORY,
            )
        if policy.leak_rate <= 0 or len(samples) < 5:
            return None
        span = samples[-1][0] - samples[0][0]
        if span < 0.9 * policy.leak_window:
            return None
        rate = self._fit.slope()
        growth = samples[-1][1] - samples[0][1]
        # Steady: most steps go up (a one-off allocation is not a leak) and the whole window
        # grew at the rate, not just its slope.
        steady = self._rising >= 0.7 * (len(samples) - 1)
        if rate >= policy.leak_rate and growth >= policy.leak_rate * span and steady:
            return Decision(
                Action.DRAIN_RESTART,
                f"memory leak: RSS grew {fmt_bytes(growth)} in {span:.0f}s"
                f" ({fmt_bytes(rate)}/s, leak_rate {fmt_bytes(policy.leak_rate)}/s)",
                data={
                    "rss_bytes": rss,
                    "growth_bytes": growth,
                    "rate_bytes_s": round(rate),
                    "max_rss": max_rss,
                },
                cause=DrainCause.MEMORY_LEAK,
            )
        return None

    def reset(self) -> None:
        self.samples.clear()
        self._fit = _RunningFit()
        self._rising = 0


class _Samples:
    """The (time, RSS) samples of a window, oldest first, as two machine arrays: 16 bytes a
    sample where a deque of tuples held some 70 (a tuple, a float and an int each): with 1,000
    instances a 60 s window was 4.3 MiB of the daemon's RSS. Taken from the front by moving a
    start index; the arrays are compacted once half of them is spent."""

    __slots__ = ("_start", "_t", "_y")

    def __init__(self) -> None:
        self._t = array.array("d")
        self._y = array.array("q")
        self._start = 0

    def __len__(self) -> int:
        return len(self._t) - self._start

    def __getitem__(self, i: int) -> tuple[float, int]:
        k = self._start + i if i >= 0 else len(self._t) + i
        if not self._start <= k < len(self._t):
            raise IndexError("sample index out of range")
        return self._t[k], self._y[k]

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return zip(self._t[self._start :], self._y[self._start :], strict=True)

    def append(self, sample: tuple[float, int]) -> None:
        self._t.append(sample[0])
        self._y.append(sample[1])

    def popleft(self) -> tuple[float, int]:
        oldest = self[0]
        self._start += 1
        if self._start >= 64 and self._start * 2 >= len(self._t):
            del self._t[: self._start]
            del self._y[: self._start]
            self._start = 0
        return oldest

    def clear(self) -> None:
        del self._t[:]
        del self._y[:]
        self._start = 0


class _RunningFit:
    """Least-squares slope of y over x from running sums of the points added and removed.

    x counts from the first point added, so that the sums of squares stay small enough for
    floats to subtract them accurately (a monotonic clock can read 10^6 and more)."""

    __slots__ = ("n", "origin", "sx", "sxx", "sxy", "sy")

    def __init__(self) -> None:
        self.origin: float | None = None
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        if self.origin is None:
            self.origin = x
        x -= self.origin
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y

    def remove(self, x: float, y: float) -> None:
        assert self.origin is not None
        x -= self.origin
        self.n -= 1
        self.sx -= x
        self.sy -= y
        self.sxx -= x * x
        self.sxy -= x * y

    def slope(self) -> float:
        n = self.n
        if n < 2:
            return 0.0
        var = self.sxx - self.sx * self.sx / n
        if var <= 1e-9 * max(self.sxx, 1.0):
            return 0.0  # every x the same (to rounding)
        return (self.sxy - self.sx * self.sy / n) / var


class CpuWatch:
    """CPU above `max_cpu_percent` in every sample of `window` seconds: a restart (the cpu
    policy's `action = "restart"`; its default, "alert", is the built-in `cpu` alert rule)."""

    __slots__ = ("over_since", "peak")

    def __init__(self) -> None:
        self.over_since: float | None = None
        self.peak = 0.0

    def observe(
        self, now: float, cpu_percent: float, max_cpu: float | None, policy: CpuPolicy
    ) -> Decision | None:
        """Add one CPU sample; decide once per sustained window."""
        if max_cpu is None or cpu_percent <= max_cpu:
            self.over_since = None
            self.peak = 0.0
            return None
        if self.over_since is None:
            self.over_since = now
        self.peak = max(self.peak, cpu_percent)
        if now - self.over_since < policy.window:
            return None
        since, peak = self.over_since, self.peak
        self.over_since = now  # the next decision needs another full window
        self.peak = 0.0
        return Decision(
            Action.DRAIN_RESTART,
            f"cpu: above max_cpu_percent {max_cpu:g}% for {now - since:.0f}s (peak {peak:.0f}%)",
            data={"cpu_percent": cpu_percent, "max_cpu_percent": max_cpu},
            cause=DrainCause.CPU,
        )


# -- slow: latency against peers ------------------------------------------------------------
def peer_median(own_id: str, latencies: dict[str, float]) -> float | None:
    """The median latency of the other instances serving the same type."""
    others = [v for k, v in latencies.items() if k != own_id]
    if not others:
        return None
    # Not statistics.median: that module pulls fractions and decimal into the daemon.
    others.sort()
    mid = len(others) // 2
    return others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2


class SlowTracker:
    """Downweights an instance whose latency EWMA is far above its peers', and gives the
    weight back step by step while latency stays normal."""

    __slots__ = ("last_change", "multiplier", "requests_at_change")

    def __init__(self) -> None:
        self.multiplier = 1.0
        self.last_change = -math.inf
        self.requests_at_change = 0

    def evaluate(
        self,
        now: float,
        latency_ms: float | None,
        requests: int,
        peers_median_ms: float | None,
        policy: SlowPolicy,
    ) -> Decision | None:
        """Judge the latest EWMA against the peers' median; `requests` is a running count."""
        if not policy.enabled:
            if self.multiplier < 1.0:
                return self._set(now, requests, 1.0, Action.RESTORE_WEIGHT, "slow policy off")
            return None
        if now - self.last_change < policy.restore_interval:
            return None
        fresh = requests - self.requests_at_change
        if self.multiplier < 1.0 and (fresh == 0 or peers_median_ms is None):
            # Nothing to judge by: a weight kept low on stale figures would never come back.
            why = "no recent requests to judge" if fresh == 0 else "no peers left to compare with"
            return self._step_back(now, requests, policy, f"{why}: weight back a step")
        if latency_ms is None or peers_median_ms is None:
            return None
        limit = max(policy.threshold * peers_median_ms, peers_median_ms + policy.min_latency_ms)
        ratio = f"{latency_ms / peers_median_ms:.1f}×" if peers_median_ms > 0 else "far above"
        figures = (
            f"latency EWMA {latency_ms:.2f} ms is {ratio} its peers' median"
            f" {peers_median_ms:.2f} ms"
        )
        if latency_ms > limit:
            if self.multiplier <= policy.floor or fresh < policy.min_requests:
                return None
            new = max(policy.floor, self.multiplier * policy.downweight)
            if new >= self.multiplier:  # downweight 1: nothing to lower, no event
                return None
            return self._set(
                now,
                requests,
                new,
                Action.DOWNWEIGHT,
                f"slow: {figures} (threshold {policy.threshold:g}×): weight × {new:.2f}",
            )
        if self.multiplier < 1.0:
            return self._step_back(
                now, requests, policy, f"latency normal again ({figures}): weight back a step"
            )
        return None

    def _step_back(self, now: float, requests: int, policy: SlowPolicy, why: str) -> Decision:
        new = min(1.0, self.multiplier / policy.downweight)
        if new <= self.multiplier:  # downweight 1 now: no step would ever get it back
            new = 1.0
        return self._set(now, requests, new, Action.RESTORE_WEIGHT, f"{why} (× {new:.2f})")

    def _set(self, now: float, requests: int, new: float, action: Action, reason: str) -> Decision:
        old = self.multiplier
        self.multiplier = new
        self.last_change = now
        self.requests_at_change = requests
        return Decision(action, reason, data={"from": round(old, 4), "to": round(new, 4)})

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


# -- failing: consecutive errors, error rate; isolation ------------------------------------
class FailureTracker:
    """Errors of one instance: in a row, and as a rate over a sliding window of counts."""

    __slots__ = ("err_seen", "isolations", "last_isolation", "ok_seen", "window")

    def __init__(self) -> None:
        self.isolations = 0  # isolations that still count toward the next one's length
        self.last_isolation = -math.inf
        # (when, ok, errors) of the ticks within the window that saw requests, oldest first.
        # A list: an empty deque holds a block of 64 slots (0.6 KiB) for every instance.
        self.window: list[tuple[float, int, int]] = []
        self.ok_seen = 0
        self.err_seen = 0

    def on_errors(
        self, consecutive: int, last_error: str, policy: FailingPolicy
    ) -> Decision | None:
        """After an error: isolate when `consecutive` reaches the bound."""
        if consecutive < policy.consecutive_errors:
            return None
        return Decision(
            Action.ISOLATE,
            f"{consecutive} consecutive error{'s' if consecutive != 1 else ''}"
            f" (last: {last_error})",
            data={"consecutive_errors": consecutive},
        )

    def on_tick(
        self, now: float, ok_total: int, err_total: int, policy: FailingPolicy
    ) -> Decision | None:
        """Fold the running counts into the window; isolate when the rate is over its bound."""
        d_ok = max(0, ok_total - self.ok_seen)
        d_err = max(0, err_total - self.err_seen)
        self.ok_seen, self.err_seen = ok_total, err_total
        window = self.window
        if d_ok or d_err:
            window.append((now, d_ok, d_err))
        old = 0
        while old < len(window) and window[old][0] <= now - policy.window:
            old += 1
        if old:
            del window[:old]
        # An isolation's weight fades: one less for each isolation_max seconds without one.
        if self.isolations and now - self.last_isolation >= policy.isolation_max:
            self.isolations -= 1
            self.last_isolation = now
        ok = sum(w[1] for w in self.window)
        err = sum(w[2] for w in self.window)
        total = ok + err
        if total < policy.min_requests or total == 0:
            return None
        rate = err / total
        if rate < policy.error_rate:
            return None
        return Decision(
            Action.ISOLATE,
            f"error rate {rate:.0%} over {total} requests in {policy.window:g}s"
            f" (at or above {policy.error_rate:.0%}, min_requests {policy.min_requests})",
            data={"error_rate": round(rate, 4), "requests": total},
        )

    def isolation_length(self, policy: FailingPolicy) -> float:
        """How long the next isolation lasts: base × its number, capped (Envoy's rule)."""
        return min(policy.isolation_max, policy.isolation_base * (self.isolations + 1))

    def isolated(self, now: float) -> None:
        """An isolation started: it counts toward the next one; the window starts afresh."""
        self.isolations += 1
        self.last_isolation = now
        self.window.clear()


def slow_start_factor(now: float, since: float | None, window: float) -> float:
    """The share of its weight a returning instance gets: ramps from 10 % to 100 %."""
    if since is None or window <= 0:
        return 1.0
    frac = (now - since) / window
    if frac >= 1.0:
        return 1.0
    return max(SLOW_START_MIN, frac)


def guard_rail(serving: int, isolated: int, max_percent: float) -> tuple[bool, int]:
    """Whether one more of `serving` instances may be isolated, and the cap.

    At least one may always be isolated, so a small group is not stuck with a bad instance
    (Envoy's small-cluster trap).
    """
    cap = max(1, math.floor(serving * max_percent / 100.0 + 1e-9))
    return isolated + 1 <= cap, cap


# -- eligibility: every reason an instance may not get (all of) its share -----------------
@dataclass(slots=True)
class Standing:
    """The policy-side facts about one instance that decide its eligibility and weight."""

    manual: Eligibility | None = None  # ISOLATED or DRAINING, set by a person
    manual_reason: str = ""
    manual_since: float = 0.0
    draining_reason: str = ""  # a policy drains it before a restart
    isolated_until: float | None = None
    isolation_reason: str = ""
    unhealthy_isolated: bool = False  # unhealthy and the guard rail allowed taking it out
    health_reason: str = ""
    slow_multiplier: float = 1.0
    slow_start_since: float | None = None

    def resolve(
        self, now: float, weight: float, slow_start: float
    ) -> tuple[Eligibility, str, float, float | None]:
        """(eligibility, reason, effective weight, isolated until) at `now`."""
        if self.manual is not None:
            why = f"by hand: {self.manual_reason}" if self.manual_reason else "by hand"
            return self.manual, why, 0.0, None
        if self.draining_reason:
            return Eligibility.DRAINING, self.draining_reason, 0.0, None
        if self.isolated_until is not None:
            return Eligibility.ISOLATED, self.isolation_reason, 0.0, self.isolated_until
        if self.unhealthy_isolated:
            return Eligibility.ISOLATED, self.health_reason, 0.0, None
        ramp = slow_start_factor(now, self.slow_start_since, slow_start)
        if ramp >= 1.0:
            self.slow_start_since = None
        factor = self.slow_multiplier * ramp
        if factor >= 1.0:
            return Eligibility.ACTIVE, "", weight, None
        reasons = []
        if self.slow_multiplier < 1.0:
            reasons.append(f"slow (× {self.slow_multiplier:.2f})")
        if ramp < 1.0:
            reasons.append(f"slow start after isolation ({ramp:.0%})")
        return Eligibility.DOWNWEIGHTED, ", ".join(reasons), weight * factor, None


# -- the policies' state of one instance ------------------------------------------------------
@dataclass(eq=False, slots=True)
class PolicyState:
    """Everything the failure policies keep about one instance: its standing and one tracker
    per fault. The enforcer owns one per instance and starts it afresh for each new process."""

    standing: Standing = field(default_factory=Standing)
    health: HealthTracker = field(default_factory=HealthTracker)
    memory: MemoryWatch = field(default_factory=MemoryWatch)
    cpu: CpuWatch = field(default_factory=CpuWatch)
    slow: SlowTracker = field(default_factory=SlowTracker)
    failures: FailureTracker = field(default_factory=FailureTracker)
    # What the last refresh of the instance read (`Enforcer.refresh`): while it is the same,
    # a refresh would give the same eligibility, weight and health.
    refreshed_on: tuple[object, ...] | None = None

    def new_process(self, now: float) -> None:
        """A new process (`starting`): what was measured of the old one says nothing about
        it; isolations, manual overrides and the error-rate window carry over."""
        self.health.reset(now)
        self.memory.reset()
        self.cpu = CpuWatch()
        self.slow.reset()
        self.standing.slow_multiplier = 1.0
        self.standing.draining_reason = ""
