"""Admission control: which requests may run now, and in what order the others wait.

Pure code over plain values with time passed in (no I/O, no processes, no asyncio), tested
without a daemon: `bucket` (a token bucket), `gradient` (the adaptive concurrency limit),
`gates` (every limit in force and which apply to a request), `queue` (priorities with aging,
fairness between callers, shortest-expected-job-first). The router applies them.

Imports the stdlib and the shared contract only, never the rest of the daemon.
"""

from __future__ import annotations

from .bucket import TokenBucket
from .gates import (
    Admission,
    EngineLimits,
    Gate,
    GateKind,
    acquire,
    adaptive_allowance,
    next_token_at,
    passes,
    release,
)
from .gradient import GradientController, GradientParams, Phase
from .queue import Entry, WaitQueue

__all__ = [
    "Admission",
    "EngineLimits",
    "Entry",
    "Gate",
    "GateKind",
    "GradientController",
    "GradientParams",
    "Phase",
    "TokenBucket",
    "WaitQueue",
    "acquire",
    "adaptive_allowance",
    "next_token_at",
    "passes",
    "release",
]
