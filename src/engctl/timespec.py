"""The `--since` values of `events` and `report` (one parser for both), and the durations of
`prewarm --for` and `lease --ttl/--wait`.

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


def parse_duration(text: str, option: str) -> float:
    """Seconds from "30s", "10m", "1.5h", "2d" or a plain number of seconds (above 0);
    else a UsageError naming `option`."""
    from engctl.errors import UsageError

    m = _DURATION.fullmatch(text)
    try:
        seconds = float(m.group(1)) * _UNITS[m.group(2)] if m else float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(
            f"{option} {text!r}: expected a duration above 0 such as 30s, 10m, 1h or 2d"
            " (a plain number is seconds)"
        )
    return seconds
