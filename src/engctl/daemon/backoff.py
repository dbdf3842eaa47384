"""Restart backoff: the delay before an instance's next start, and when to give up instead
(fatal after too many failed starts, or when flapping). Docs: docs/policies.md.

Pure decisions over plain values (the caller passes `now`); the supervisor carries them out.

Imports the shared contract and `policies`' decision vocabulary only.
"""

from __future__ import annotations

import dataclasses

from engctl.models import BackoffSpec, RestartSpec
from engctl.policy_config import CrashPolicy

from .policies import Action, Decision

# Spawns that failed for lack of the daemon's resources back off from at least this delay.
MIN_SPAWN_RETRY_DELAY = 0.1


def backoff_delay(backoff: BackoffSpec, attempt: int) -> float:
    """Seconds to wait before restart number `attempt` (1-based): initial × factor^(n-1),
    capped at max; 0 for no attempt or an initial delay of 0."""
    if attempt <= 0 or backoff.initial == 0:
        return 0.0
    # The exponent is bounded: a crash loop long enough would overflow a float.
    return min(backoff.max, backoff.initial * backoff.factor ** min(attempt - 1, 1024 // 8))


def spawn_retry_delay(backoff: BackoffSpec, retries: int) -> float:
    """Seconds before spawning again after `retries` spawns in a row failed for lack of fds or
    processes: the engine's backoff, from at least MIN_SPAWN_RETRY_DELAY."""
    floor = max(backoff.initial, MIN_SPAWN_RETRY_DELAY)
    return backoff_delay(dataclasses.replace(backoff, initial=floor), retries + 1)


class CrashTracker:
    """Restart decisions after unexpected exits: capped exponential backoff that resets after
    healthy uptime, fatal after too many failed starts, fatal when flapping."""

    def __init__(self) -> None:
        self.attempt = 0  # backoff attempts since the last reset
        self.quick_failures = 0  # exits before start_seconds, in a row
        # Restarts within the flapping window, oldest first. A list: an empty deque holds a
        # block of 64 slots (0.6 KiB) for every instance, which seldom restarts at all.
        self.restart_times: list[float] = []

    def started(self) -> None:
        """The process stayed up start_seconds: failed starts no longer count."""
        self.quick_failures = 0

    def reset(self) -> None:
        """Started by hand: a fresh budget."""
        self.attempt = 0
        self.quick_failures = 0
        self.restart_times.clear()

    def on_exit(
        self,
        now: float,
        uptime: float,
        quick: bool,
        desc: str,
        restart: RestartSpec,
        crash: CrashPolicy,
    ) -> Decision:
        """Decide after an exit the restart policy wants restarted: when, or give up."""
        if uptime >= restart.backoff.reset_after:
            self.attempt = 0
        if quick:
            self.quick_failures += 1
            if self.quick_failures > restart.max_retries:
                return Decision(
                    Action.FATAL,
                    f"gave up after {self.quick_failures} failed starts"
                    f" (max_retries {restart.max_retries}): {desc}",
                )
        times, old = self.restart_times, 0
        while old < len(times) and times[old] <= now - crash.flap_window:
            old += 1
        del times[:old]
        if len(self.restart_times) >= crash.flap_max_restarts:
            return Decision(
                Action.FATAL,
                f"flapping: {len(self.restart_times)} restarts in the last"
                f" {crash.flap_window:g}s (flap_max_restarts {crash.flap_max_restarts}): {desc}",
                data={"restarts_in_window": len(self.restart_times)},
            )
        self.attempt += 1
        self.restart_times.append(now)
        delay = backoff_delay(restart.backoff, self.attempt)
        return Decision(
            Action.RESTART,
            f"{desc}; restart in {delay:g}s (attempt {self.attempt})",
            delay=delay,
            data={"attempt": self.attempt},
        )
