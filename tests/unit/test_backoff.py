"""Restart backoff (`engctl.daemon.backoff`): the delay before the next start. Pure."""

from __future__ import annotations

from engctl.daemon.backoff import backoff_delay, spawn_retry_delay
from engctl.models import BackoffSpec


def test_backoff_delay_doubles_and_caps() -> None:
    """Delays grow by the factor from `initial` and stop at `max`."""
    b = BackoffSpec(initial=0.5, factor=2.0, max=3.0)
    assert [backoff_delay(b, n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_backoff_delay_is_zero_before_the_first_attempt() -> None:
    """Attempt numbers below 1 wait nothing."""
    assert backoff_delay(BackoffSpec(), 0) == 0.0
    assert backoff_delay(BackoffSpec(), -3) == 0.0


def test_backoff_with_zero_initial_never_waits() -> None:
    """initial = 0 means immediate restarts whatever the attempt."""
    b = BackoffSpec(initial=0.0)
    assert all(backoff_delay(b, n) == 0.0 for n in range(1, 50))


def test_backoff_huge_attempt_stays_capped() -> None:
    """A very large attempt number gives the cap, not an overflow."""
    assert backoff_delay(BackoffSpec(initial=1.0, factor=2.0, max=30.0), 1000) == 30.0


def test_spawn_retry_delay_backs_off_from_a_tenth_of_a_second() -> None:
    """Spawns refused for lack of fds or processes retry on the engine's backoff, from at
    least 0.1 s (also with `initial = 0`), and no faster than its cap allows."""
    b = BackoffSpec(initial=0.0, factor=2.0, max=1.0)
    assert [spawn_retry_delay(b, n) for n in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert spawn_retry_delay(BackoffSpec(initial=0.5, factor=3.0, max=30.0), 1) == 1.5
    assert spawn_retry_delay(BackoffSpec(), 64) == BackoffSpec().max
