"""The `--since` values of `events` and `report` (one parser for both), and the durations of
`prewarm --for` and `lease --ttl/--wait` (`parse_duration`) and of config files
(`config_duration`: an alert's `for = "30s"`, a hook's `timeout`): one duration syntax.

Stdlib only (and `datetime` only when the value is a date): the CLI imports it at start-up.
"""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw])?\s*")


def _seconds(text: str) -> float | None:
    """Seconds from "500ms", "30s", "10m", "1.5h", "2d", "1w" or a plain number; else None."""
    m = _DURATION.fullmatch(text)
    return float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else None


def parse_since(text: str, now: float) -> float:
    """Epoch seconds from "90s", "10m", "1h", "7d", "2w" (ago) or an ISO date/time (local)."""
    from engctl.errors import UsageError

    m = _DURATION.fullmatch(text)
    if m and m.group(2):
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 90s, 10m, 1h, 7d, 2w or a date/time"
            " such as 2026-11-22T10:00"
        ) from None


def parse_duration(text: str, option: str) -> float:
    """Seconds from "30s", "10m", "1.5h", "2d" or a plain number of seconds (above 0);
    else a UsageError naming `option`."""
    from engctl.errors import UsageError

    seconds = _seconds(text)
    if seconds is None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(
            f"{option} {text!r}: expected a duration above 0 such as 30s, 10m, 1h or 2d"
            " (a plain number is seconds)"
        )
    return seconds


def config_duration(value: object, where: str) -> float:
    """Seconds from a config value: a number (0 or more) or a string such as "500ms", "30s",
    "5m", "1h" or "2d"; a SpecError naming `where` otherwise."""
    from engctl.errors import SpecError

    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _seconds(value)
    if seconds is None or not 0 <= seconds < float("inf"):
        raise SpecError(
            f'{where}: expected a duration such as "30s", "500ms", "5m" or a number of'
            f" seconds, got {value!r}"
        )
    return seconds
