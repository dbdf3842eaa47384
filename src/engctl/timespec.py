"""The `--since` values of `events` and `report` (one parser for both), and the durations of
config files (`for = "30s"`, a hook's `timeout`).

Stdlib only (and `datetime` only when the value is a date): the CLI imports it at start-up.
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")


def parse_since(text: str, now: float) -> float:
    """Epoch seconds from "90s", "10m", "1h", "7d", "2w" (ago) or an ISO date/time (local)."""
    from engctl.errors import UsageError

    m = _DURATION.fullmatch(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 90s, 10m, 1h, 7d, 2w or a date/time"
            " such as 2026-11-22T10:00"
        ) from None


_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_SPAN_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, where: str) -> float:
    """Seconds from a number or a string such as "500ms", "30s", "5m", "1h" or "2d"; a
    SpecError naming `where` otherwise."""
    from engctl.errors import SpecError

    if isinstance(value, int | float) and not isinstance(value, bool):
        if value >= 0 and value == value and value != float("inf"):
            return float(value)
    elif isinstance(value, str):
        m = _SPAN.fullmatch(value)
        if m:
            return float(m.group(1)) * _SPAN_UNITS[m.group(2) or "s"]
    raise SpecError(
        f'{where}: expected a duration such as "30s", "500ms", "5m" or a number of'
        f" seconds, got {value!r}"
    )
