"""The adaptive concurrency limit of an engine: a gradient controller over measured latency, as
Envoy's adaptive concurrency filter and Netflix's gradient limits do it.

Two phases. Measuring: the limit is pinned to `min_limit` until `min_rtt_requests` answers give
the minimum round-trip time (their median: latency with no queueing in the worker). Steady:
every `interval` seconds, the median latency of the answers since the last update (the sample
RTT) gives the gradient `(min RTT × (1 + buffer)) / sample RTT`, clamped to [0.5, 2]; the new
limit is `limit × gradient + sqrt(limit × gradient)` (the headroom lets it probe upwards),
clamped to [min_limit, max_limit]. Every `min_rtt_interval` seconds it measures again (the
floor may have moved). Under overload the limit settles just above the knee of the latency
curve: in-flight requests the engine can take without queueing inside it.

Part of `engctl.daemon.admission`: pure, time is passed in. Imports the stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    MEASURING = "measuring"  # the limit is pinned to min_limit while the min RTT is taken
    STEADY = "steady"


@dataclass(frozen=True)
class GradientParams:
    """The controller's settings (docs/admission.md#adaptive-concurrency)."""

    min_limit: int = 1
    max_limit: int = 1000
    interval: float = 0.1  # seconds between two updates (at least `min_samples` answers)
    min_samples: int = 5
    min_rtt_requests: int = 25  # answers at min_limit that give the min RTT
    min_rtt_interval: float = 30.0  # seconds between two measurements of the min RTT
    buffer: float = 0.1  # latency within min RTT × (1 + buffer) counts as no queueing

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(
                f"need 1 <= min_limit <= max_limit, not {self.min_limit}, {self.max_limit}"
            )


def _median(values: list[float]) -> float:
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class GradientController:
    """One engine's adaptive limit; feed it each answer's latency (`sample`)."""

    def __init__(self, now: float, params: GradientParams | None = None) -> None:
        self.params = params or GradientParams()
        p = self.params
        self.phase = Phase.MEASURING
        self.limit = p.min_limit
        self.resume = p.min_limit  # the limit to go back to after a measurement
        self.min_rtt_ms: float | None = None
        self.sample_rtt_ms: float | None = None
        self.gradient: float | None = None
        self.reason = f"measuring the min RTT: limit pinned to {p.min_limit}"
        self.changed_at = now
        self.measured_at = now
        self._window: list[float] = []
        self._window_start = now

    def set_max(self, max_limit: int) -> None:
        """The engine's capacity changed (scale, max_concurrency, max_in_flight)."""
        max_limit = max(self.params.min_limit, max_limit)
        if max_limit == self.params.max_limit:
            return
        self.params = GradientParams(**{**self.params.__dict__, "max_limit": max_limit})
        self.limit = min(self.limit, max_limit)
        self.resume = min(self.resume, max_limit)

    def sample(self, latency_ms: float, now: float) -> bool:
        """Count one answer; True when the limit moved (its `reason` says why)."""
        self._window.append(latency_ms)
        p = self.params
        if self.phase is Phase.MEASURING:
            if len(self._window) < p.min_rtt_requests:
                return False
            self.min_rtt_ms = _median(self._window)
            self._window = []
            self._window_start = now
            self.measured_at = now
            self.phase = Phase.STEADY
            old = self.limit
            self.limit = max(p.min_limit, min(p.max_limit, self.resume))
            self.reason = (
                f"min RTT {self.min_rtt_ms:.2f} ms over {p.min_rtt_requests} requests at limit"
                f" {p.min_limit}: back to {self.limit}"
            )
            self.changed_at = now
            return self.limit != old
        if now - self._window_start < p.interval or len(self._window) < p.min_samples:
            return False
        if now - self.measured_at >= p.min_rtt_interval:
            return self._measure(now)
        return self._update(now)

    def _update(self, now: float) -> bool:
        p = self.params
        assert self.min_rtt_ms is not None
        sample = _median(self._window)
        self._window = []
        self._window_start = now
        self.sample_rtt_ms = sample
        target = self.min_rtt_ms * (1.0 + p.buffer)
        gradient = max(0.5, min(2.0, target / sample)) if sample > 0 else 2.0
        self.gradient = gradient
        raw = self.limit * gradient
        new = max(p.min_limit, min(p.max_limit, round(raw + math.sqrt(raw))))
        if new == self.limit:
            return False
        old, self.limit = self.limit, new
        self.reason = (
            f"gradient {gradient:.2f}: median latency {sample:.2f} ms against min RTT"
            f" {self.min_rtt_ms:.2f} ms (+{p.buffer:.0%}): limit {old} -> {new}"
        )
        self.changed_at = now
        return True

    def _measure(self, now: float) -> bool:
        p = self.params
        self.phase = Phase.MEASURING
        self.resume = self.limit
        self._window = []
        old, self.limit = self.limit, p.min_limit
        self.reason = (
            f"measuring the min RTT again (every {p.min_rtt_interval:g}s): limit {old} -> "
            f"{p.min_limit} for {p.min_rtt_requests} requests"
        )
        self.changed_at = now
        return old != self.limit

    def to_json(self, now: float, wall: float) -> dict[str, object]:
        """The controller as `status --json` shows it (an engine's `admission.adaptive`);
        `now` is the clock of its samples, `wall` the epoch time at `now`."""
        return {
            "limit": self.limit,
            "phase": self.phase.value,
            "min_rtt_ms": None if self.min_rtt_ms is None else round(self.min_rtt_ms, 3),
            "sample_rtt_ms": None if self.sample_rtt_ms is None else round(self.sample_rtt_ms, 3),
            "gradient": None if self.gradient is None else round(self.gradient, 3),
            "reason": self.reason,
            "changed_at": round(wall - (now - self.changed_at), 3),
            "max_limit": self.params.max_limit,
        }
