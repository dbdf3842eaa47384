"""Unit tests of the human-output formatters: durations, sizes, exits and event lines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from engctl.render.format import clock, duration, event_line, last_exit, size


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC for the test, and the real zone again after it."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0.0s"),
        (3, "3.0s"),
        (9.94, "9.9s"),
        (10, "10s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (252, "4m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7500, "2h05m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    """Durations use the two largest units, tenths below ten seconds, and `-` when unknown."""
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0B"),
        (512, "512B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (int(14.2 * 1024**2), "14.2MiB"),
        (3 * 1024**3, "3.0GiB"),
        (5 * 1024**4, "5120.0GiB"),
    ],
)
def test_size(n: int | None, text: str) -> None:
    """Sizes are whole bytes below 1 KiB, else one decimal in the largest binary unit to GiB."""
    assert size(n) == text


@pytest.mark.parametrize(
    ("info", "text"),
    [
        (None, "-"),
        ({}, "-"),
        ({"code": 1, "signal": None}, "code 1"),
        ({"code": 0}, "code 0"),
        ({"code": None, "signal": "SIGKILL"}, "SIGKILL"),
        ({"error": "no such file: /bin/nope", "code": None}, "no such file: /bin/nope"),
    ],
)
def test_last_exit(info: dict[str, Any] | None, text: str) -> None:
    """A spawn error wins over a signal, which wins over the exit code."""
    assert last_exit(info) == text


def test_clock_is_local_time_to_the_millisecond(utc: None) -> None:
    """Epoch timestamps are shown as local date and time with milliseconds."""
    assert clock(0.25) == "1970-01-01 00:00:00.250"
    assert clock(None) == "-"


def test_event_line_with_a_state_edge(utc: None) -> None:
    """An instance event shows time, instance, the edge and the reason."""
    ev = {"at": 60.5, "instance": "web#0", "engine": "web", "from": "starting", "to": "ready"}
    ev["reason"] = "ready notification"
    assert event_line(ev) == "1970-01-01 00:01:00.500  web#0 starting -> ready: ready notification"


def test_event_line_without_an_edge(utc: None) -> None:
    """An engine event without a state edge shows the engine and the reason."""
    ev = {"at": 0, "engine": "web", "reason": "registered"}
    assert event_line(ev) == "1970-01-01 00:00:00.000  web: registered"


def test_event_line_of_the_daemon_with_missing_fields() -> None:
    """An event naming no engine or instance is the daemon's; missing fields show as `-`."""
    assert event_line({}) == "-  daemon: "
