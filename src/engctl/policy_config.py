"""Failure-policy settings: built-in defaults, `[daemon.policy]` and `[engines.NAME.policy]`.

Shared contract between CLI and daemon: stdlib only. Both tables have the same shape (one
sub-table per fault); an engine's values win over the daemon's, which win over the defaults.
`effective_policy` merges them and says where each value came from (`engctl policy show`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from engctl.errors import SpecError

# Validated overrides: {section: {key: value}}, only the keys someone set.
PolicyOverrides = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class CrashPolicy:
    """Restarts beyond backoff: too many in `flap_window` seconds → fatal (flapping)."""

    flap_window: float = 60.0
    flap_max_restarts: int = 10
    cooldown: float = 0.0  # seconds before a fatal instance is tried again; 0 = by hand only


@dataclass(frozen=True)
class HangPolicy:
    """A request past its deadline whose instance does not answer ping in time is a hang."""

    enabled: bool = True
    ping_timeout: float = 2.0


@dataclass(frozen=True)
class MemoryPolicy:
    """RSS above the engine's `limits.max_rss`, or growing steadily (a leak) → drain, restart;
    with `action = "alert"`, RSS above max_rss fires the built-in `memory` alert instead."""

    leak_window: float = 60.0
    leak_rate: int = 1024 * 1024  # bytes per second of sustained growth; 0 turns it off
    drain_timeout: float = 10.0
    action: str = "restart"


@dataclass(frozen=True)
class CpuPolicy:
    """CPU above `limits.max_cpu_percent` for `window` seconds → the built-in `cpu` alert, or
    a restart."""

    window: float = 30.0
    action: str = "alert"


@dataclass(frozen=True)
class SlowPolicy:
    """Latency EWMA above `threshold` × its peers' median → effective weight × `downweight`."""

    enabled: bool = True
    threshold: float = 3.0
    min_requests: int = 20
    min_latency_ms: float = 1.0  # differences below this are noise, never "slow"
    downweight: float = 0.5
    floor: float = 0.05
    restore_interval: float = 2.0


@dataclass(frozen=True)
class FailingPolicy:
    """Consecutive errors, or an error rate over a minimum volume → isolate for a while."""

    consecutive_errors: int = 5
    error_rate: float = 0.5
    min_requests: int = 20
    window: float = 10.0
    isolation_base: float = 30.0
    isolation_max: float = 300.0
    slow_start: float = 30.0


@dataclass(frozen=True)
class PolicySpec:
    """Every failure policy of one engine, fully resolved."""

    max_isolated_percent: float = 50.0
    crash: CrashPolicy = field(default_factory=CrashPolicy)
    hang: HangPolicy = field(default_factory=HangPolicy)
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)
    cpu: CpuPolicy = field(default_factory=CpuPolicy)
    slow: SlowPolicy = field(default_factory=SlowPolicy)
    failing: FailingPolicy = field(default_factory=FailingPolicy)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: top-level numbers, then one object per section."""
        out: dict[str, Any] = {"max_isolated_percent": self.max_isolated_percent}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: getattr(section, f.name) for f in fields(section)}
        return out


SECTIONS: dict[str, type] = {
    "crash": CrashPolicy,
    "hang": HangPolicy,
    "memory": MemoryPolicy,
    "cpu": CpuPolicy,
    "slow": SlowPolicy,
    "failing": FailingPolicy,
}
TOP = "top"  # the section name of top-level keys (max_isolated_percent) in overrides

# (low, high, low is exclusive) for numbers; checked when read.
_RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    (TOP, "max_isolated_percent"): (0.0, 100.0, False),
    ("crash", "flap_window"): (0.0, 86400.0, True),
    ("crash", "flap_max_restarts"): (1, 1_000_000, False),
    ("crash", "cooldown"): (0.0, 86400.0, False),
    ("hang", "ping_timeout"): (0.0, 3600.0, True),
    ("memory", "leak_window"): (0.0, 86400.0, True),
    ("memory", "leak_rate"): (0, 1 << 50, False),
    ("memory", "drain_timeout"): (0.0, 3600.0, False),
    ("cpu", "window"): (0.0, 86400.0, True),
    ("slow", "threshold"): (1.0, 1000.0, True),
    ("slow", "min_requests"): (1, 1_000_000, False),
    ("slow", "min_latency_ms"): (0.0, 1e6, False),
    ("slow", "downweight"): (0.0, 1.0, True),
    ("slow", "floor"): (0.0, 1.0, True),
    ("slow", "restore_interval"): (0.0, 3600.0, True),
    ("failing", "consecutive_errors"): (1, 1_000_000, False),
    ("failing", "error_rate"): (0.0, 1.0, True),
    ("failing", "min_requests"): (1, 1_000_000, False),
    ("failing", "window"): (0.0, 86400.0, True),
    ("failing", "isolation_base"): (0.0, 86400.0, True),
    ("failing", "isolation_max"): (0.0, 86400.0, True),
    ("failing", "slow_start"): (0.0, 3600.0, False),
}
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "action"): ("alert", "restart"),
    ("memory", "action"): ("restart", "alert"),
}
# Old spellings still read: the cpu policy's "event" became the built-in `cpu` alert.
_ALIASES: dict[tuple[str, str, str], str] = {("cpu", "action", "event"): "alert"}


def _read_value(section: str, key: str, default: Any, value: Any, where: str) -> Any:
    if (section, key) == ("memory", "leak_rate") and isinstance(value, str):
        from engctl.models import parse_size  # sizes are spelled like limits.max_rss

        if value.strip().lower() in ("0", "off"):
            return 0
        return parse_size(value, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, str):
        choices = _CHOICES[(section, key)]
        if isinstance(value, str):
            value = _ALIASES.get((section, key, value), value)
        if value not in choices:
            raise SpecError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if isinstance(default, int) and not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    lo, hi, open_lo = _RANGES[(section, key)]
    if value > hi or value < lo or (open_lo and value == lo):
        low = f"above {lo:g}" if open_lo else f"at least {lo:g}"
        raise SpecError(f"{where}: must be {low} and at most {hi:g}, got {value:g}")
    return type(default)(value)


def parse_policy_table(table: Any, where: str) -> PolicyOverrides:
    """Validate one policy table (daemon or engine); return only the keys it sets."""
    if not isinstance(table, Mapping):
        raise SpecError(f"{where}: expected a table such as [{where}.failing]")
    out: PolicyOverrides = {}
    default = PolicySpec()
    for name, value in table.items():
        if name == "max_isolated_percent":
            out.setdefault(TOP, {})[name] = _read_value(
                TOP, name, default.max_isolated_percent, value, f"{where}.{name}"
            )
            continue
        cls = SECTIONS.get(name)
        if cls is None:
            known = ", ".join(["max_isolated_percent", *SECTIONS])
            raise SpecError(f"{where}.{name}: unknown key {name!r} (expected {known})")
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}.{name}: expected a table, got {value!r}")
        defaults = {f.name: getattr(getattr(default, name), f.name) for f in fields(cls)}
        section: dict[str, Any] = {}
        for key, raw in value.items():
            if key not in defaults:
                raise SpecError(
                    f"{where}.{name}.{key}: unknown key {key!r}"
                    f" (expected {', '.join(sorted(defaults))})"
                )
            section[key] = _read_value(name, key, defaults[key], raw, f"{where}.{name}.{key}")
        if section:
            out[name] = section
    return out


def overrides_to_toml(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The table form of validated overrides (export, registry)."""
    out: dict[str, Any] = dict(overrides.get(TOP, {}))
    for name, section in overrides.items():
        if name != TOP:
            out[name] = dict(section)
    return out


def effective_policy(
    daemon: Mapping[str, Mapping[str, Any]], engine: Mapping[str, Mapping[str, Any]]
) -> tuple[PolicySpec, dict[str, dict[str, str]]]:
    """The merged policy and, per section and key, its source: default, daemon or engine."""
    spec = PolicySpec()
    sources: dict[str, dict[str, str]] = {}
    top_src: dict[str, str] = {"max_isolated_percent": "default"}
    for origin, layer in (("daemon", daemon), ("engine", engine)):
        if "max_isolated_percent" in layer.get(TOP, {}):
            spec = replace(spec, max_isolated_percent=layer[TOP]["max_isolated_percent"])
            top_src["max_isolated_percent"] = origin
    sources[TOP] = top_src
    for name, cls in SECTIONS.items():
        values = {f.name: getattr(getattr(spec, name), f.name) for f in fields(cls)}
        src = dict.fromkeys(values, "default")
        for origin, layer in (("daemon", daemon), ("engine", engine)):
            for key, value in layer.get(name, {}).items():
                values[key] = value
                src[key] = origin
        spec = replace(spec, **{name: cls(**values)})
        sources[name] = src
    if spec.failing.isolation_max < spec.failing.isolation_base:
        spec = replace(
            spec, failing=replace(spec.failing, isolation_max=spec.failing.isolation_base)
        )
    return spec, sources
