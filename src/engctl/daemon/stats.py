"""Request accounting of one instance (or one oneshot engine): every finished attempt counted
once with its outcome, the latency EWMA and histogram, and the errors in a row.

Plain counters, no I/O: the router records, the failure policies, status, metrics and the
history read. Imports the shared contract only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engctl.histogram import Histogram
from engctl.states import RequestOutcome

if TYPE_CHECKING:
    from engctl.documents import RequestCounts

# Weight of the newest latency in the EWMA.
EWMA_ALPHA = 0.2

# The counter of RequestStats that each outcome adds to (their names on the wire).
OUTCOME_FIELDS = {
    RequestOutcome.OK: "ok",
    RequestOutcome.ERROR: "errors",
    RequestOutcome.TIMEOUT: "timeouts",
    RequestOutcome.LOST: "lost",
}


@dataclass
class RequestStats:
    """Rolling request observations of an instance (fed by the request router).

    `requests` counts finished attempts and always equals ok + errors + timeouts + lost:
    every attempt is counted once, by one of the `record_*` methods, with its one outcome.
    """

    in_flight: int = 0
    requests: int = 0
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    latency_ewma_ms: float | None = None
    lost: int = 0  # in flight when the process died (the crash policy's business)
    consecutive_errors: int = 0  # reset by every success (the failing policy reads it)
    last_error: str = ""
    # Lines on the worker's stdout that broke the protocol (not an outcome: garbage between
    # requests belongs to none; the requests it fails are counted as errors).
    protocol_errors: int = 0
    # Latencies of successful requests since the daemon started (bounded: 256 buckets).
    hist: Histogram = field(default_factory=Histogram)

    def record_ok(self, latency_ms: float, histogram: bool) -> float:
        """Count a success taking `latency_ms` (into the histogram too with `histogram`);
        returns the new latency EWMA."""
        self.requests += 1
        self.ok += 1
        self.consecutive_errors = 0
        if histogram:
            self.hist.record_ms(latency_ms)
        prev = self.latency_ewma_ms
        ewma = latency_ms if prev is None else prev + EWMA_ALPHA * (latency_ms - prev)
        self.latency_ewma_ms = ewma
        return ewma

    def record_error(self, why: str) -> None:
        """Count an attempt the instance failed (an error answer, protocol garbage)."""
        self.requests += 1
        self.errors += 1
        self.blame(why)

    def record_timeout(self) -> None:
        """Count an attempt whose caller's deadline passed first (not the instance's fault)."""
        self.requests += 1
        self.timeouts += 1

    def record_lost(self) -> None:
        """Count an attempt lost with its process (the crash policy's business)."""
        self.requests += 1
        self.lost += 1

    def blame(self, why: str) -> None:
        """An error of the instance: one more in a row, and the last one's text."""
        self.consecutive_errors += 1
        self.last_error = why

    def new_process(self) -> None:
        """A new process: what was measured of the old one says nothing about it."""
        self.latency_ewma_ms = None
        self.consecutive_errors = 0

    def count(self, outcome: RequestOutcome) -> int:
        """Attempts that ended with `outcome`."""
        return int(getattr(self, OUTCOME_FIELDS[outcome]))

    def to_json(self) -> RequestCounts:
        return {
            "in_flight": self.in_flight,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "lost": self.lost,
            "consecutive_errors": self.consecutive_errors,
            "protocol_errors": self.protocol_errors,
            "latency_ewma_ms": None
            if self.latency_ewma_ms is None
            else round(self.latency_ewma_ms, 3),
        }
