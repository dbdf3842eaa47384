"""Admission settings: rates ("200/s"), request priorities (names and numbers), and the daemon's
limits (`[daemon.limits]`: a global in-flight cap, per-type and per-caller limits, aging). An
engine's own limits (`[engines.X.limits]` rate, burst, max_in_flight, adaptive) are read by
`models` with the helpers here.

Shared contract between CLI and daemon: stdlib only. Every message names the field it rejects
(docs/admission.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engctl.errors import InvalidParamsError, SpecError

# Priorities are integers from 0 (served last) to 9 (served first); three have names.
PRIORITY_MIN = 0
PRIORITY_MAX = 9
PRIORITIES = {"low": 2, "normal": 5, "high": 8}
DEFAULT_PRIORITY = PRIORITIES["normal"]
# The key of `[daemon.limits.callers]` whose settings apply to every caller not named there
# (each such caller gets limits of its own, with these values).
ANY_CALLER = "*"
# A request sent without --caller belongs to this caller.
ANONYMOUS = ""
# Seconds of waiting worth one priority level (aging): a request of priority p waits at most
# (9 - p) x aging behind requests of higher priority that arrived after it.
DEFAULT_AGING = 1.0
MAX_IN_FLIGHT = 1_000_000
MAX_BURST = 1_000_000

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PER.update({"h": 3600.0, "hour": 3600.0})


class QueueOrder(StrEnum):
    """How the requests of one type wait (`[daemon.limits] types.T.queue`)."""

    FAIR = "fair"  # priority, then round robin between callers, then arrival
    SJF = "sjf"  # ... then shortest expected job first (the latency the daemon measures)


def parse_rate(value: Any, where: str) -> float:
    """Requests per second from "200/s", "30/m", "1000/h" or a positive number (per second)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    elif isinstance(value, str):
        m = _RATE.fullmatch(value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) / _PER[m.group(2)]
    raise SpecError(
        f'{where}: expected a rate such as "200/s", "30/m", "1000/h" or a number per second,'
        f" got {value!r}"
    )


def format_rate(per_second: float) -> str:
    """The shortest exact spelling of a rate (export form): "200/s", "30/m" or "1000/h"."""
    for unit, mult in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        n = per_second * mult
        if abs(n - round(n)) < 1e-9 and round(n) >= 1:
            return f"{round(n)}/{unit}"
    return f"{per_second:g}/s"


def default_burst(per_second: float) -> int:
    """Tokens a bucket holds when nothing sets `burst`: one second's worth (at least one)."""
    return max(1, math.ceil(per_second - 1e-9))


def parse_priority(value: Any, where: str = "priority") -> int:
    """A priority from a name (low, normal, high) or an integer from 0 to 9 (also as text)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITIES:
            return PRIORITIES[text]
        if text.isascii() and text.isdigit():
            value = int(text)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and PRIORITY_MIN <= value <= PRIORITY_MAX
    ):
        return value
    names = ", ".join(PRIORITIES)
    raise InvalidParamsError(
        f"{where}: unknown priority {value!r} (use {names}, or an integer from {PRIORITY_MIN}"
        f" to {PRIORITY_MAX}; higher is served first)"
    )


def priority_name(value: int) -> str:
    """The name of a priority, or its number as text."""
    for name, number in PRIORITIES.items():
        if number == value:
            return name
    return str(value)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `rate` tokens per second, at most `burst` held."""

    rate: float
    burst: int

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rate": format_rate(self.rate)}
        if self.burst != default_burst(self.rate):
            out["burst"] = self.burst
        return out


def read_rate(data: Mapping[str, Any], where: str) -> RateLimit | None:
    """`rate` and `burst` of a limits table (a burst needs a rate)."""
    raw_rate, raw_burst = data.get("rate"), data.get("burst")
    if raw_burst is not None:
        if isinstance(raw_burst, bool) or not isinstance(raw_burst, int):
            raise SpecError(
                f"{where}.burst: expected a whole number of requests, got {raw_burst!r}"
            )
        if not 1 <= raw_burst <= MAX_BURST:
            raise SpecError(f"{where}.burst: must be from 1 to {MAX_BURST}, got {raw_burst}")
        if raw_rate is None:
            raise SpecError(
                f'{where}.burst: needs a rate (the bucket\'s refill), e.g. rate = "100/s"'
            )
    if raw_rate is None:
        return None
    rate = parse_rate(raw_rate, f"{where}.rate")
    return RateLimit(rate, default_burst(rate) if raw_burst is None else raw_burst)


def read_cap(data: Mapping[str, Any], key: str, where: str) -> int | None:
    """An in-flight cap: a positive integer."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}.{key}: expected a whole number of requests, got {value!r}")
    if not 1 <= value <= MAX_IN_FLIGHT:
        raise SpecError(f"{where}.{key}: must be from 1 to {MAX_IN_FLIGHT}, got {value}")
    return value


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(
            f"{where}.{unknown[0]}: unknown key {unknown[0]!r} (expected {', '.join(known)})"
        )


def _table(value: Any, where: str, example: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a table such as {example}, got {value!r}")
    return value


@dataclass(frozen=True)
class TypeLimits:
    """Limits of every request for one engine type (`[daemon.limits] types.T`)."""

    rate: RateLimit | None = None
    max_in_flight: int | None = None
    queue: QueueOrder = QueueOrder.FAIR

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = self.rate.to_toml() if self.rate is not None else {}
        if self.max_in_flight is not None:
            out["max_in_flight"] = self.max_in_flight
        if self.queue is not QueueOrder.FAIR:
            out["queue"] = self.queue.value
        return out


@dataclass(frozen=True)
class CallerLimits:
    """Limits of one caller (`--caller`), and its share when callers of a priority compete."""

    rate: RateLimit | None = None
    weight: float = 1.0

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = self.rate.to_toml() if self.rate is not None else {}
        if self.weight != 1.0:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class DaemonLimits:
    """`[daemon.limits]`: what applies to every request, besides each engine's own limits."""

    max_in_flight: int | None = None
    aging: float = DEFAULT_AGING
    types: Mapping[str, TypeLimits] = field(default_factory=dict)
    callers: Mapping[str, CallerLimits] = field(default_factory=dict)

    def caller(self, name: str) -> CallerLimits | None:
        """The limits of caller `name`: its own table, else the `"*"` one, else none."""
        found = self.callers.get(name)
        return found if found is not None else self.callers.get(ANY_CALLER)

    def to_toml(self) -> dict[str, Any]:
        """The table as config.toml writes it."""
        out: dict[str, Any] = {}
        if self.max_in_flight is not None:
            out["max_in_flight"] = self.max_in_flight
        out["aging"] = self.aging
        if self.types:
            out["types"] = {t: v.to_toml() for t, v in sorted(self.types.items())}
        if self.callers:
            out["callers"] = {c: v.to_toml() for c, v in sorted(self.callers.items())}
        return out


def parse_daemon_limits(value: Any, where: str) -> DaemonLimits:
    """Validate `[daemon.limits]`; a SpecError names the field it rejects."""
    data = _table(value, where, "{ max_in_flight = 256 }")
    _check_keys(data, ("max_in_flight", "aging", "types", "callers"), where)
    aging = data.get("aging", DEFAULT_AGING)
    if isinstance(aging, bool) or not isinstance(aging, int | float) or not math.isfinite(aging):
        raise SpecError(f"{where}.aging: expected seconds per priority level, got {aging!r}")
    if not 0 < aging <= 3600:
        raise SpecError(f"{where}.aging: must be above 0 and at most 3600 seconds, got {aging:g}")
    types: dict[str, TypeLimits] = {}
    for name, table in _table(data.get("types", {}), f"{where}.types", "{ onnx = {…} }").items():
        here = f"{where}.types.{name}"
        t = _table(table, here, '{ max_in_flight = 8, rate = "100/s" }')
        _check_keys(t, ("rate", "burst", "max_in_flight", "queue"), here)
        order = t.get("queue", QueueOrder.FAIR.value)
        if order not in tuple(QueueOrder):
            raise SpecError(f"{here}.queue: expected fair or sjf, got {order!r}")
        types[str(name)] = TypeLimits(
            read_rate(t, here), read_cap(t, "max_in_flight", here), QueueOrder(order)
        )
    callers: dict[str, CallerLimits] = {}
    for name, table in _table(data.get("callers", {}), f"{where}.callers", "{…}").items():
        here = f"{where}.callers.{name}"
        c = _table(table, here, '{ rate = "10/s", weight = 2 }')
        _check_keys(c, ("rate", "burst", "weight"), here)
        weight = c.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise SpecError(f"{here}.weight: expected a number, got {weight!r}")
        if not math.isfinite(weight) or not 0 < weight <= 1000:
            raise SpecError(f"{here}.weight: must be above 0 and at most 1000, got {weight!r}")
        callers[str(name)] = CallerLimits(read_rate(c, here), float(weight))
    return DaemonLimits(read_cap(data, "max_in_flight", where), float(aging), types, callers)
